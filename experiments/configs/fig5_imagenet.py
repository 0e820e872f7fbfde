"""Fig. 5 of the PFA paper: ResNet-18 on ImageNet (tensorflow-datasets ``imagenet2012``, streamed by
``pfa_jax.app.streaming``), 75 epochs, batch 256, lr 0.1 x0.1 at 20/40/60, wd 1e-4, random-resized
224 crop + flip; PFA wd 5e-4 in epoch 0, then 1e-4; BP, uSF (the paper's SF) and PFA, seed 0.
Reported (top-1 validation accuracy %): BP 69.69, SF 64.60, PFA 68.46.

ImageNet needs a manual download and one preparation as array_record (``pfa_jax.app.streaming.
HOW_TO_PREPARE``); pass its directory with ``--set data_dir=...`` or ``$TFDS_DATA_DIR``."""
from experiments.configs import common

RULES = ("bp", "usf", "pfa")


def get_config():
    return common.resnet18_paper("imagenet2012")


def runs():
    return common.sweep("fig5", seeds=(0,), rules=RULES)
