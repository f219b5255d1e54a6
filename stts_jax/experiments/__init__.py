"""Experiments built from the library: the main job (`main_job.run`) and its report."""
