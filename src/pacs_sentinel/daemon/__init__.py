"""The process: CLI, configuration, job queue, scheduler, workers, logging."""
