"""resnet50_tb_full.py for tests that run the trainer in its own processes (torchrun): the same command
line, less logging the model to MLflow (conftest.MODEL_LOGGING: torch.export and the servable copy of the
checkpoint take seconds a run). The tests marked real_log_model log it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import MODEL_LOGGING  # noqa: E402

import resnet50_tb_full  # noqa: E402

if __name__ == "__main__":
    for name, skipped in MODEL_LOGGING.items():
        if hasattr(resnet50_tb_full, name):
            setattr(resnet50_tb_full, name, skipped)
    resnet50_tb_full.main(sys.argv[1:])
