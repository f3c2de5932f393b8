"""Indexed (.bin/.idx) data: both stacks build the same blended train/validation/test samples from real files,
and data that cannot work is refused up front with one line."""

from __future__ import annotations

import json

import pytest
from ut_helpers import (
    compose,
    describe_both,
    run_cli,
    run_python,
    write_hf_tokenizer,
    write_indexed_prefix,
)

from unified_train.modes import parity

DATA = ["data=indexed", "data.tokenizer_type=NullTokenizer", "data.tokenizer_model=null"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_indexed_prefix(root / "a", 300, seed=0)
    write_indexed_prefix(root / "b", 500, seed=1)
    return root


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return write_hf_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_a_tokenizer_of_its_own_sizes_both_embeddings(corpus, hf_tokenizer):
    """A Hugging Face tokenizer brings its own vocabulary: both stacks size (and pad) the embedding from it, not
    from model.vocab_size, and the parity diff sees what each stack's setup will build."""
    cfg = compose(
        [
            "data=indexed",
            f"data.tokenizer_model={hf_tokenizer}",
            f"data.data_path=[{corpus}/a]",
            "data.split='90,5,5'",
            "parallel.dp=1",
        ]
    )
    both = describe_both(cfg)
    assert both["mlm"]["gpt.vocab_size"] == both["bridge"]["gpt.vocab_size"] == 1024  # 1000 padded to 128
    assert parity.diff(both["mlm"], both["bridge"]) == []


# Builds each stack's datasets the way its pretrain does: MLM through our dataset provider and MLM's
# build_train_valid_test_datasets (sample counts from its args), Bridge through its own provider and loader
# helper (sample counts from the ConfigContainer), both from the configs translated from one unified config.
_BUILD_BOTH = """
import json, os, sys
import numpy as np
import torch.distributed as dist
from unified_train import backends, resources, rundir
from unified_train.backends.mlm import glue
from unified_train.compose import compose

cfg = compose(json.loads(sys.argv[1]))
job = rundir.identity(cfg, world_size=resources.world_size(cfg))
m, b = (backends.get(name).native_config(cfg, job) for name in ("mlm", "bridge"))
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel()

from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.training import global_vars, training
global_vars._GLOBAL_ARGS = m.args
build_tokenizer(m.args)
mlm_sets = training.build_train_valid_test_datasets(glue.datasets_provider(m.data_seed))

from megatron.bridge.data.loaders import build_train_valid_test_datasets
from megatron.bridge.data.utils import get_dataset_provider
from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer as bridge_tokenizer
c = b.container
c.dataset.tokenizer = bridge_tokenizer(c.tokenizer)
bridge_sets = build_train_valid_test_datasets(c, get_dataset_provider(c.dataset))

out = {}
for name, x, y in zip(("train", "valid", "test"), mlm_sets, bridge_sets):
    out[name] = {"type": type(x).__name__, "lengths": [len(x), len(y)], "keys": sorted(x[0]),
                 "equal": all(sorted(x[i]) == sorted(y[i]) and all(np.array_equal(x[i][k], y[i][k]) for k in x[i])
                              for i in range(len(x))),
                 "first": x[0]["tokens"][:4].tolist()}
print("RESULT", json.dumps(out))
"""


def test_both_stacks_draw_the_same_blended_samples(corpus, hf_tokenizer, tmp_path):
    from unified_train.runtime.ranks import free_port

    overrides = [
        "data=indexed",
        f"data.tokenizer_model={hf_tokenizer}",
        "data.split='90,5,5'",
        f"data.data_path=['0.3 {corpus}/a','0.7 {corpus}/b']",
    ]
    proc = run_python(_BUILD_BOTH, tmp_path, timeout=400, args=(json.dumps(overrides), str(free_port())))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, needed in (("train", 320), ("valid", 128), ("test", 64)):  # 10 iterations x 32, 2 evals x 2 x 32, ...
        split = result[name]
        assert split["type"] == "BlendedDataset", split
        assert split["lengths"][0] == split["lengths"][1] >= needed, split
        assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(split["keys"]) and split["equal"], split
    assert result["train"]["first"] != result["valid"]["first"]  # the splits are different documents


def test_data_path_prefixes_read_like_mcore():
    from unified_train.datafiles import prefixes

    assert prefixes(["0.3 /d/a", "0.7 /d/b"]) == ["/d/a", "/d/b"]
    assert prefixes(["/d/a"]) == ["/d/a"]
    assert prefixes(["/d/a", "/d/b"]) == ["/d/a", "/d/b"]  # even count, but no weights


def test_sequence_count_is_read_from_the_index_header(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from unified_train.datafiles import sequence_count

    assert sequence_count(str(corpus / "a")) == len(IndexedDataset(str(corpus / "a"))) == 300


def test_a_split_that_gets_no_sequence_is_refused(corpus, tmp_path):
    """The default split 9999,8,2 leaves the validation split of a 300-sequence prefix empty; MCore would then
    loop for ever building its sample index. Refused before anything starts."""
    proc = run_cli([*DATA, f"data.data_path=[{corpus}/a]", "mode=parity"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("unified_train:")]
    assert line.startswith(
        "unified_train: data.split=9999,8,2: the validation and test split gets none of the 300 "
        f"sequences of {corpus}/a"
    ), line
    assert "validation.eval_iters=0" in line
    assert list(tmp_path.iterdir()) == []
    cfg = compose([*DATA, f"data.data_path=[{corpus}/a]", "validation.eval_iters=0"])
    from unified_train import datafiles

    assert datafiles.problems(cfg) == []  # nothing is drawn from validation or test then


def test_missing_data_files_are_refused(tmp_path):
    proc = run_cli([*DATA, f"data.data_path=[{tmp_path}/nowhere]", "mode=parity"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("unified_train:")]
    assert (
        line
        == f"unified_train: data.data_path: {tmp_path}/nowhere.bin not found: give the prefixes of .bin/.idx pairs, "
        "without the extension"
    )


def test_a_split_without_shares_is_refused(corpus):
    from unified_train import datafiles

    cfg = compose([*DATA, f"data.data_path=[{corpus}/a]", "data.split='0,0,0'"])
    (line,) = datafiles.problems(cfg)
    assert line.startswith("data.split=0,0,0: give up to three non-negative shares"), line
