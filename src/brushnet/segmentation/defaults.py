"""Defaults of the open-vocabulary detector, importable without torch (the CLI's help shows them)."""

# IDEA-Research's demo thresholds for Grounding DINO: a box is kept when its best token scores
# above BOX_THRESHOLD; TEXT_THRESHOLD only decides which words label it.
BOX_THRESHOLD = 0.35
TEXT_THRESHOLD = 0.25
