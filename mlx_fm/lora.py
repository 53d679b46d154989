"""Fine-tune an FM model: `mlx_fm.lora --model PATH --train --data DIR [...]`.

mlx-lm's tuner, unchanged: LoRA, DoRA (`--fine-tune-type dora`) or full
fine-tuning, its data formats (completions, chat, text jsonl), `--mask-prompt`,
and its YAML keys (`lora_parameters: {rank, scale, dropout, keys}`), on float or
quantized FM models. `import mlx_fm` registers the FM model type with mlx-lm.
"""

import sys

from .cli import fail_cleanly


@fail_cleanly
def main(argv=None):
    from mlx_lm import lora

    sys.argv = ["mlx_fm.lora", *(sys.argv[1:] if argv is None else argv)]
    lora.main()


if __name__ == "__main__":
    main()
