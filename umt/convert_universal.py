"""`python -m umt.convert_universal --input_folder ... --output_folder ...`: DeepSpeed's
`ds_to_universal`, with every checkpoint file loaded weights-only (it would unpickle anything)."""

from __future__ import annotations

from deepspeed.checkpoint import ds_to_universal

from umt.checkpoint import CheckpointError, weights_only_loads

if __name__ == "__main__":
    args = ds_to_universal.parse_arguments()
    with weights_only_loads():
        try:
            ds_to_universal.main(args)
        except CheckpointError as exc:
            raise SystemExit(str(exc)) from None
