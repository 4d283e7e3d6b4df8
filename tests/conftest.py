import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_corpus_dir(tmp_path_factory):
    """A few small real-text 'plays' as local files (group = file) for fast pipeline tests."""
    d = tmp_path_factory.mktemp("toy_corpus")
    lines = [
        "To be, or not to be, that is the question.",
        "Whether tis nobler in the mind to suffer the slings and arrows of outrageous fortune.",
        "Or to take arms against a sea of troubles, and by opposing end them.",
        "To die, to sleep, no more; and by a sleep to say we end the heart-ache.",
        "All the world's a stage, and all the men and women merely players.",
        "They have their exits and their entrances, and one man in his time plays many parts.",
        "Now is the winter of our discontent made glorious summer by this sun of York.",
        "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    ]
    for g in range(6):
        with open(d / f"play{g}.jsonl", "w") as fh:
            import json

            for i in range(40):
                text = " ".join(lines[(g + i + k) % len(lines)] for k in range(1 + i % 3))
                fh.write(json.dumps({"text": text}) + "\n")
    return d


@pytest.fixture(scope="session")
def toy_config(toy_corpus_dir):
    from harness.core.config import load_config

    return load_config(
        {
            "study": "toy",
            "size": "tiny",
            "data": {
                "corpus": {"name": "text-files", "paths": [str(toy_corpus_dir / "*.jsonl")]},
                "tokenizer": {"kind": "bpe", "vocab_size": 300},
                "seq_len": 32,
                "max_len": 32,
                "valid_fraction": 0.2,
                "test_fraction": 0.2,
            },
            "runs": [{"method": "ar", "layout": "fixed"}],
            "train": {"steps": 6, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "warmup": 2},
        }
    )


@pytest.fixture(scope="session")
def toy_data(toy_config, tmp_path_factory):
    from harness.data.prepare import prepare

    out = tmp_path_factory.mktemp("toy_data")
    prepare(toy_config["data"], out)
    return out
