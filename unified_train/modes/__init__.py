"""The modes that build native configs without training: parity, export and preflight."""
