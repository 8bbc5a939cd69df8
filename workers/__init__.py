"""RQ job functions, worker start-up and the reaper."""
