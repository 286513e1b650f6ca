"""CLI: ``python -m nemo_basic.export {import-hf,init-from-hf,export-hf} ...`` (see ``--help``).

Heavy imports happen inside the commands: checkpoint saving spawns a helper process that
re-imports this module, which must stay cheap to import.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _basic_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BASIC settings stored in the checkpoint's config")
    g.add_argument("--no-basic", action="store_true", help="store BASIC disabled (plain LLaVA training)")
    g.add_argument("--basic-layers", type=int, default=None, help="k: supervise from layers 1..k (default L//2)")
    g.add_argument("--basic-weighting", default="inc", choices=("inc", "const", "dec"))
    g.add_argument("--basic-degree", default="attention", choices=("attention", "equal"))
    g.add_argument("--lambda-das", type=float, default=1.0)
    g.add_argument("--lambda-sds", type=float, default=0.01)


def _basic(args):
    from nemo_basic.models.basic_config import BasicConfig

    return BasicConfig(enabled=not args.no_basic, layers=args.basic_layers, weighting=args.basic_weighting,
                       degree=args.basic_degree, lambda_das=args.lambda_das, lambda_sds=args.lambda_sds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nemo_basic.export",
                                     description="Convert between Hugging Face LLaVA and nemo_basic NeMo 2 checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-hf", help="HF LlavaForConditionalGeneration directory -> our checkpoint")
    p.add_argument("--hf", required=True, help="HF LLaVA directory (config.json, safetensors, tokenizer, processor)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--seq-length", type=int, default=None, help="max combined sequence (default: min(LLM max, 4096))")
    p.add_argument("--freeze-language-model", action="store_true", help="store the LLM as frozen (stage 1)")
    p.add_argument("--overwrite", action="store_true")
    _basic_args(p)

    p = sub.add_parser("init-from-hf", help="HF LLM + HF vision encoder + fresh projector -> stage-1 checkpoint")
    p.add_argument("--llm", required=True, help="HF Llama-family LLM directory (with tokenizer)")
    p.add_argument("--vision", required=True, help="HF CLIP / SigLIP / DINOv2 directory (with image processor)")
    p.add_argument("--out", required=True)
    p.add_argument("--vision-feature-layer", type=int, default=-2)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=None, help="input pixels (default: the processor's crop)")
    p.add_argument("--seed", type=int, default=1234, help="projector initialisation seed")
    p.add_argument("--train-language-model", action="store_true", help="store the LLM as trainable (stage 2)")
    p.add_argument("--overwrite", action="store_true")
    _basic_args(p)

    p = sub.add_parser("export-hf", help="our checkpoint -> HF LlavaForConditionalGeneration directory")
    p.add_argument("--checkpoint", required=True, help="our (NeMo 2) checkpoint directory")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="weights dtype (default bfloat16, as llava-hf ships; float32 for exact logits)")
    p.add_argument("--chat-template", default=None, choices=("plain", "vicuna_v1", "tokenizer"),
                   help="chat template (default: the training data's template recorded in the checkpoint; "
                        "'tokenizer': the LLM's own text template)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="shard the safetensors above this size (model.safetensors.index.json), e.g. 5GB, 500MB")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--image-processor", default=None,
                   help="image processor directory (default: the one training recorded with the checkpoint)")
    p.add_argument("--image-token", default=None, help="image placeholder token (default: recorded or <image>)")
    p.add_argument("--overwrite", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import nemo_basic  # noqa: F401  (CPU backend before Megatron / NeMo)
    from nemo_basic.export.checkpoint import say

    start = time.perf_counter()
    try:
        if args.command == "import-hf":
            from nemo_basic.export.hf import import_hf_llava

            import_hf_llava(args.hf, args.out, basic=_basic(args), seq_length=args.seq_length,
                            overwrite=args.overwrite, freeze_language_model=args.freeze_language_model)
        elif args.command == "init-from-hf":
            from nemo_basic.export.hf import init_from_hf

            init_from_hf(args.llm, args.vision, args.out, basic=_basic(args), overwrite=args.overwrite,
                         seed=args.seed, vision_feature_layer=args.vision_feature_layer,
                         seq_length=args.seq_length, image_size=args.image_size,
                         freeze_language_model=not args.train_language_model)
        else:
            from nemo_basic.export.hf import export_hf_llava

            export_hf_llava(args.checkpoint, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                            image_processor_dir=args.image_processor, image_token=args.image_token,
                            overwrite=args.overwrite, chat_template=args.chat_template,
                            max_shard_size=args.max_shard_size)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say(f"{args.command} finished in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
