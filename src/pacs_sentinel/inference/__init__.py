"""Model registry, pipelines, pre/post-processing, demo models and their training."""
