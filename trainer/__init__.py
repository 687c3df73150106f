"""Semi-online training: score-conditioned LoRA SFT that resumes from the serving adapter each round.

    dataset.py   scored episodes -> chat examples with the achieved score's label; held-out split; export
    sft.py       TRL SFTTrainer + PEFT LoRA, configured for speed per device (fp32 on CPU, bf16 on CUDA)
    round.py     train_round: new blocks + replay sample -> candidate adapter; resumes interrupted rounds
    registry.py  adapter versions on disk and in the store; atomic folders; publish / reject
    gate.py      gate_decision (pure) and promote_or_reject
    dpo.py       optional objective "dpo": winner/loser pairs for the same (ticker, as_of)

Multi-GPU: `accelerate launch --num_processes 2 -m scheduler.cli train` runs the same round under
DDP; ranks share the training_runs row and only the main process writes adapters and rows.
"""
