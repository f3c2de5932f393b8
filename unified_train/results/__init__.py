"""What runs produce and how they are judged: the metrics sink, W&B, the pair comparison, panels, the callback."""
