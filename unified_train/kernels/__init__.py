"""Implementation choices both stacks share: the core attention and the layer specs built fresh per job."""
