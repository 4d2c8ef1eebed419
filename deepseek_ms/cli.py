"""`deepseek-ms` command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from .config import KERNEL_CHOICES

logger = logging.getLogger("deepseek_ms.cli")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "deepseek-ms-tiny")  # trained by yaml/train_tiny.yaml
SERVE_CONFIG = os.path.join(REPO_ROOT, "yaml", "serve_default.yaml")


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
        llm = LLM(args.model, kernels=args.kernels)
        if llm.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer files; use --prompt-ids")
        out = llm.generate(args.prompt, SamplingParams(temperature=args.temperature, max_tokens=args.max_new_tokens,
                                                       seed=args.seed))[0]
        print(out.text)
        return 0
    from .api import load_model
    model = load_model(args.model, kernels=args.kernels)
    ids = model.generate(np.array([args.prompt_ids], dtype=np.int64), max_new_tokens=args.max_new_tokens,
                         do_sample=args.temperature > 0, temperature=args.temperature or 1.0, seed=args.seed)
    print(",".join(str(int(t)) for t in ids[0]))
    return 0


def cmd_chat(args) -> int:
    """Interactive chat: each reply streams as it is generated; an empty line or EOF quits."""
    from .engine.sampling import SamplingParams
    from .llm import LLM
    llm = LLM(args.model, kernels=args.kernels)
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


def cmd_bench(args) -> int:
    """Hardware or collective microbenchmarks: a table on stdout and a JSON file."""
    from . import bench
    if args.what == "hw":
        result = bench.bench_hw(args.sizes, args.dtypes, args.memory_mb, args.repeats, args.device_target)
        bench.print_hw(result)
    else:
        result = bench.bench_comm(args.sizes_kb, args.repeats)
        if result["rank"] != 0:
            return 0
        bench.print_comm(result)
    bench.write_json(result, args.output or f"bench_{args.what}.json")
    return 0


def cmd_client(args) -> int:
    """One request to a running MindSpore Serving front end (servable `deepseek`) over gRPC."""
    import json

    from .serving.grpc_client import ServingClient, ServingError
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    with ServingClient(args.address, timeout=args.timeout) as client:
        try:
            if args.method == "generate":
                out = client.generate(args.prompt, **sampling)
            else:
                out = client.chat(args.messages if args.messages is not None
                                  else [{"role": "user", "content": args.user}], **sampling)
        except ServingError as e:
            logger.error("%s", e)
            return 1
    print(json.dumps(out, ensure_ascii=False) if args.json else out["text"])
    return 0


def cmd_serve(args) -> int:
    """Engine server + OpenAI API + MindSpore Serving until Ctrl+C / SIGTERM (deepseek_ms/serving/launcher.py)."""
    from .serving.launcher import load_settings, run
    from .yaml_config import parse_cli_overrides

    overrides = parse_cli_overrides(args.overrides)
    for key, value in (("serve.host", args.host), ("serve.openai.api_key", args.api_key)):
        if value is not None:
            overrides[key] = value
    if args.no_ms_serving:
        overrides["serve.ms_serving.enabled"] = False
    return run(load_settings(args.config, args.model, overrides))


def cmd_train(args) -> int:
    """Train (or resume) as the YAML says, then export an HF folder (deepseek_ms/train/)."""
    from .train.trainer import run
    from .yaml_config import parse_cli_overrides
    folder = run(args.config, parse_cli_overrides(args.overrides))
    logger.info("exported the trained model to %s", folder)
    return 0


def add_kernels_arg(parser: argparse.ArgumentParser) -> None:
    """--kernels, for the commands that load a model (and the engine server)."""
    parser.add_argument("--kernels", choices=KERNEL_CHOICES, default=None,
                        help="native CPU kernels where they help (auto) or MindSpore's ops only; "
                             "default: a YAML's model.model_config.kernels, else auto")


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
    add_kernels_arg(g)
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="interactive streaming chat (needs a tokenizer with a chat template)")
    ch.add_argument("--model", required=True)
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.7)
    add_kernels_arg(ch)
    ch.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="measure the hardware (hw) or the collectives under msrun (comm)")
    bench_what = b.add_subparsers(dest="what", required=True)
    hw = bench_what.add_parser("hw", help="GEMM GFLOP/s by size and dtype, memory bandwidth")
    hw.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048], help="square GEMM sizes")
    hw.add_argument("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16", "bfloat16"])
    hw.add_argument("--memory-mb", type=int, default=256, help="array size for the bandwidth tests")
    hw.add_argument("--device-target", default="CPU")
    cm = bench_what.add_parser("comm", help="AllReduce/AllGather latency and bandwidth (launch under msrun)")
    cm.add_argument("--sizes-kb", type=int, nargs="+", default=[4, 64, 1024, 16384], help="message sizes in KiB")
    for sp in (hw, cm):
        sp.add_argument("--repeats", type=int, default=3)
        sp.add_argument("--output", default=None, help="JSON path (default bench_hw.json / bench_comm.json)")
    b.set_defaults(func=cmd_bench)

    c = sub.add_parser("convert", help="write a model as a MindSpore checkpoint and verify it")
    c.add_argument("--model", required=True)
    c.add_argument("--output", required=True, help="output folder (config.json + model.ckpt)")
    c.set_defaults(func=cmd_convert)

    cl = sub.add_parser("client", help="send one request to a running MindSpore Serving (gRPC)")
    cl.add_argument("--address", default="127.0.0.1:5500", help="Serving gRPC address HOST:PORT")
    cl.add_argument("--timeout", type=float, default=None, help="seconds to wait for the reply")
    cl_methods = cl.add_subparsers(dest="method", required=True)
    cl_gen = cl_methods.add_parser("generate", help="complete a text prompt")
    cl_gen.add_argument("--prompt", required=True)
    cl_chat = cl_methods.add_parser("chat", help="reply to a conversation through the chat template")
    messages = cl_chat.add_mutually_exclusive_group(required=True)
    messages.add_argument("--messages", help='OpenAI-style JSON, e.g. \'[{"role": "user", "content": "Hi"}]\'')
    messages.add_argument("--user", help="a single user message")
    for method in (cl_gen, cl_chat):
        method.add_argument("--max-tokens", type=int, default=128)
        method.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        method.add_argument("--top-p", type=float, default=1.0)
        method.add_argument("--json", action="store_true", help="print text, finish_reason and token counts as JSON")
    cl.set_defaults(func=cmd_client)

    s = sub.add_parser("serve", help="engine server + OpenAI API + MindSpore Serving (Ctrl+C stops)")
    s.add_argument("--config", default=SERVE_CONFIG, help="mindformers-style YAML with a serve: section")
    s.add_argument("--model", default=None, help="model folder (default: the YAML's pretrained_model_dir, "
                                                 "else the embedded default model)")
    s.add_argument("--host", default=None, help="address every port binds to (default 127.0.0.1)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the OpenAI API")
    s.add_argument("--no-ms-serving", action="store_true", help="do not start MindSpore Serving")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted YAML overrides, e.g. serve.openai.port=8001 serve.engine.max_num_seqs=32")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("train", help="train a model from a mindformers-style train YAML, then export it")
    t.add_argument("--config", required=True, help="train YAML, e.g. yaml/train_tiny.yaml")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted YAML overrides, e.g. runner_config.stop_step=100 resume_training=True")
    t.set_defaults(func=cmd_train)
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
