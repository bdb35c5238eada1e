"""Caption metrics (pycocoevalcap), CIDEr-D for training, and split evaluation reports."""

from vgpt_cli.evaluate.caption_files import load_predictions as load_predictions
from vgpt_cli.evaluate.caption_files import load_references as load_references
from vgpt_cli.evaluate.cider_d import CiderD as CiderD
from vgpt_cli.evaluate.metrics import METRICS as METRICS
from vgpt_cli.evaluate.metrics import MetricReport as MetricReport
from vgpt_cli.evaluate.metrics import compute_metrics as compute_metrics
from vgpt_cli.evaluate.metrics import compute_metrics_many as compute_metrics_many
