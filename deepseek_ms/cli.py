"""`deepseek-ms` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

logger = logging.getLogger("deepseek_ms.cli")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO_ROOT, "tests", "fixtures", "deepseek_v3_tiny")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _parse_ids(text: str) -> List[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def cmd_generate(args) -> int:
    import numpy as np

    if args.prompt is not None:
        from .engine.sampling import SamplingParams
        from .llm import LLM
        llm = LLM(args.model)
        if llm.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer files; use --prompt-ids")
        out = llm.generate(args.prompt, SamplingParams(temperature=args.temperature, max_tokens=args.max_new_tokens,
                                                       seed=args.seed))[0]
        print(out.text)
        return 0
    from .api import load_model
    model = load_model(args.model)
    ids = model.generate(np.array([args.prompt_ids], dtype=np.int64), max_new_tokens=args.max_new_tokens,
                         do_sample=args.temperature > 0, temperature=args.temperature or 1.0, seed=args.seed)
    print(",".join(str(int(t)) for t in ids[0]))
    return 0


def cmd_chat(args) -> int:
    """Interactive chat: each reply streams as it is generated; an empty line or EOF quits."""
    from .engine.sampling import SamplingParams
    from .llm import LLM
    llm = LLM(args.model)
    if llm.tokenizer is None or not llm.tokenizer.chat_template:
        raise ValueError(f"{args.model} has no tokenizer with a chat template")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    engine = llm.engine
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        engine.add_request("chat", list(prompt), SamplingParams(temperature=args.temperature,
                                                                max_tokens=args.max_new_tokens))
        reply = []
        sys.stdout.write("assistant> ")
        while engine.has_unfinished_requests():
            for out in engine.step():
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
                reply.append(out.delta_text)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_convert(args) -> int:
    import numpy as np

    from .api import load_model
    from .checkpoint.convert import load_ms_checkpoint, save_ms_checkpoint
    model = load_model(args.model)
    path = save_ms_checkpoint(model.net, args.output)
    # read it back into the same network and prove every parameter survived bit-exact
    before = {n: p.asnumpy().copy() for n, p in model.net.parameters_and_names()}
    load_ms_checkpoint(model.net, path)
    for name, param in model.net.parameters_and_names():
        if not np.array_equal(before[name], param.asnumpy()):
            logger.error("parameter %s changed after the MindSpore checkpoint round trip", name)
            return 1
    logger.info("converted %s -> %s (%d parameters, read back bit-exact)", args.model, path, len(before))
    return 0


def cmd_serve(args) -> int:
    import numpy as np

    from .api import load_model
    logger.info("serving stack not built yet: running a generation demo on %s", args.model)
    model = load_model(args.model)
    prompt = np.array([[0, 17, 23, 42, 5]], dtype=np.int64)
    ids = model.generate(prompt, max_new_tokens=16)
    logger.info("prompt ids %s -> generated ids %s", prompt[0].tolist(), ids[0, prompt.shape[1]:].tolist())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepseek-ms", description="DeepSeek V2/V3/R1 in MindSpore")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="greedy/sampled generation from prompt token ids")
    g.add_argument("--model", required=True, help="HF folder, converted folder or predict YAML")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids", type=_parse_ids, help="token ids, e.g. 0,17,234 (prints ids)")
    src.add_argument("--prompt", help="text (needs tokenizer files in the model folder; prints text)")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive streaming chat (needs a tokenizer with a chat template)")
    ch.add_argument("--model", required=True)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.set_defaults(func=cmd_chat)

    c = sub.add_parser("convert", help="write a model as a MindSpore checkpoint and verify it")
    c.add_argument("--model", required=True)
    c.add_argument("--output", required=True, help="output folder (config.json + model.ckpt)")
    c.set_defaults(func=cmd_convert)

    s = sub.add_parser("serve", help="serve a model (currently: a generation demo)")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.set_defaults(func=cmd_serve)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError and CheckpointError are ValueErrors
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
