"""Run folder: the files a run writes and reads back (layout) and self-describing
checkpoints read without unpickling code (checkpoint).
"""
