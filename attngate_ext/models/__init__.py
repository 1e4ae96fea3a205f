"""The models wing: gated attention wired into Hugging Face Llama-style models, gate save/load, calibration."""
