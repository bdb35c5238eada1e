"""Caption decoding over the captioner's KV cache: beam search, greedy, sampling for SCST."""

from vgpt_cli.decode.options import DecodeOptions as DecodeOptions
from vgpt_cli.decode.search import Hypothesis as Hypothesis
from vgpt_cli.decode.search import Samples as Samples
from vgpt_cli.decode.search import beam_search as beam_search
from vgpt_cli.decode.search import cut_note as cut_note
from vgpt_cli.decode.search import decode as decode
from vgpt_cli.decode.search import decode_arrays as decode_arrays
from vgpt_cli.decode.search import greedy as greedy
from vgpt_cli.decode.search import pad_features as pad_features
from vgpt_cli.decode.search import sample as sample
from vgpt_cli.decode.search import sequence_log_probs as sequence_log_probs
