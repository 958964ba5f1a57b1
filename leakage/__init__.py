"""The rooms of hybrid.py: the paper (paper.py) and every other concern in a file named for it."""
