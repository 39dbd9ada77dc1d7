"""The job queue, without torch: job rows and their lifecycle, the scheduler, the one submission gate,
the torchrun command as data, the processes of a job, failure diagnosis, and the launcher daemon."""
