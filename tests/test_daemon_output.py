"""Daemon output is logfmt only: library log lines, Python warnings and training losses all come out
as `ts=... level=... event=...` lines, and the libraries' progress bars are off."""

from __future__ import annotations

import io
import logging
import re
import warnings

import datasets
import transformers
from transformers import TrainerControl, TrainerState, TrainingArguments

from scheduler.logs import LIBRARY_LOGGERS, log_event, setup_daemon_output
from trainer.sft import LossEvents

LOGFMT = re.compile(r'^ts=\S+ level=[a-z]+ event=[a-z_]+( [a-z_]+=("([^"\\]|\\.)*"|\S+))*$')


def test_library_logs_warnings_and_losses_are_logfmt_lines(tmp_path):
    out = io.StringIO()
    setup_daemon_output(stream=out)
    try:
        warnings.warn("a setting is deprecated", FutureWarning, stacklevel=1)
        transformers.utils.logging.get_logger("transformers.trainer").warning("a library warning\nover two lines")
        logging.getLogger("datasets").warning("a datasets warning")
        cb = LossEvents(lambda **f: log_event("train_step", **f))
        state = TrainerState(global_step=3, max_steps=10)
        cb.on_log(TrainingArguments(output_dir=str(tmp_path), report_to="none"), state, TrainerControl(),
                  logs={"loss": 1.25, "learning_rate": 2e-4, "epoch": 0.3})
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
    finally:  # other tests in this process see the libraries as they were
        logging.captureWarnings(False)
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
        transformers.utils.logging.enable_default_handler()
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(LOGFMT.match(line) for line in lines), lines
    assert "event=log logger=py.warnings" in lines[0] and "deprecated" in lines[0]
    assert "logger=transformers.trainer" in lines[1] and "a library warning\\nover two lines" in lines[1]
    assert "logger=datasets" in lines[2]
    assert "event=train_step step=3 max_steps=10 loss=1.25 lr=0.0002 epoch=0.3" in lines[3]
