"""Turning experiment files into jobs and running them (the sequential executor until the GPU runner lands)."""
