"""Playbooks: a session's journal dumped as a replayable script, and its replay."""
