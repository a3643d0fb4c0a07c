"""Generated from protos/audiomesh/v1 by scripts/gen_protos.py. Do not edit."""
