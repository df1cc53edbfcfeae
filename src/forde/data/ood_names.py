"""The OOD sets `eval.ood` may name: names only, so that a config is checked without loading any image library."""

NOISE = ("gaussian_noise", "uniform_noise")  # need no download
DOWNLOADED = ("svhn", "cifar10", "cifar100", "tinyimagenet")
OOD_SETS = NOISE + DOWNLOADED
