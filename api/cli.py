"""``tailor``: the command line.

    tailor models prepare                 convert the bundled GGUF into a checkpoint directory (once)
    tailor generate --prompt TEXT         one-shot generation on the bundled model (or --model DIR)
    tailor chat                           an interactive chat on the terminal
    tailor db upgrade|downgrade           apply or revert the platform's schema migrations
    tailor serve [--port N]               the embedded default: api + engine + tasks in one process
    tailor serve api|inference            one service of a multi-service deployment
    tailor worker                         the Celery worker (adapter validation)

Services read their settings from TAILOR_* environment variables (see README, "Configuration").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="bundled model name or checkpoint directory")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailor", description="Tailor: multi-tenant LoRA serving")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="manage the bundled model")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser("prepare", help="convert the bundled GGUF to a checkpoint directory")
    prepare.add_argument("--force", action="store_true", help="convert again even if cached")

    generate = sub.add_parser("generate", help="generate a completion")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_engine_args(generate)

    chat = sub.add_parser("chat", help="interactive chat on the terminal")
    _add_engine_args(chat)

    db = sub.add_parser("db", help="the platform's database schema (Alembic migrations)")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("--revision", default=None, help="target revision (default: head / base)")
    db.add_argument("--database-url", default=None,
                    help="SQLAlchemy URL (default: $TAILOR_DATABASE_URL or sqlite:///var/tailor.db)")

    serve = sub.add_parser("serve", help="run the service (embedded default, or one service)")
    serve.add_argument("service", nargs="?", choices=["api", "inference"], default=None,
                       help="api or inference alone; omit for the embedded default")
    serve.add_argument("--host", default=None, help="listen address (default: TAILOR_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None,
                       help="listen port (default: PORT, TAILOR_PORT, 8000; 8001 for inference)")
    serve.add_argument("--tensor-parallel-size", type=int, default=None,
                       help="split the model over N ranks: N-1 worker processes, one GPU each on CUDA "
                            "(default: TAILOR_TENSOR_PARALLEL_SIZE or 1)")

    sub.add_parser("worker", help="run the Celery worker that validates adapters")
    return parser


def _params(args: argparse.Namespace):
    from inference import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )


def _cmd_models_prepare(args: argparse.Namespace) -> int:
    from inference.bundled_model import prepare_bundled_model

    prepared = prepare_bundled_model(force=args.force)
    state = "prepared" if prepared.created else "already prepared"
    print(f"{state}: {prepared.path} (gguf sha256 {prepared.gguf_sha256})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from inference import LLM

    params = _params(args)
    with LLM(args.model, device=args.device, dtype=args.dtype) as llm:
        if args.chat:
            out = llm.chat([[{"role": "user", "content": args.prompt}]], params)[0]
        else:
            out = llm.generate([args.prompt], params)[0]
    print(out.text)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from inference import LLM

    params = _params(args)
    print(f"loading {args.model} ...", flush=True)
    with LLM(args.model, device=args.device, dtype=args.dtype) as llm:
        history: list[dict[str, str]] = []
        print("Type a message and press Enter; an empty line or Ctrl-D quits.")
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            history.append({"role": "user", "content": line})
            reply = llm.chat([history], params)[0].text
            history.append({"role": "assistant", "content": reply})
            print(f"model> {reply}")
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    from tenants import migrate
    from tenants.settings import Settings

    url = args.database_url
    if url is None:
        settings = Settings()
        if settings.database_url is None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
    if args.action == "upgrade":
        migrate.upgrade(url, args.revision or "head")
    else:
        migrate.downgrade(url, args.revision or "base")
    print(f"{args.action}d {url.split('@')[-1]} to {migrate.current(url) or 'base'}")
    return 0


def _serve_settings(args: argparse.Namespace):
    import os

    from tenants.settings import Settings

    overrides: dict = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    elif "PORT" in os.environ:
        overrides["port"] = int(os.environ["PORT"])
    elif args.service == "inference" and "TAILOR_PORT" not in os.environ:
        overrides["port"] = 8001
    if args.tensor_parallel_size is not None:
        overrides["tensor_parallel_size"] = args.tensor_parallel_size
    return Settings(**overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    from api.serve import serve_api, serve_embedded

    settings = _serve_settings(args)
    if args.service == "inference":
        from inference.service.app import run_inference_service
        from tenants.storage import make_object_store

        settings.check_for("inference")
        run_inference_service(settings, make_object_store(settings))
    elif args.service == "api":
        serve_api(settings)
    else:
        serve_embedded(settings)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from tenants.settings import Settings
    from tenants.worker import run_worker

    return run_worker(Settings())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"generate": _cmd_generate, "chat": _cmd_chat, "db": _cmd_db, "serve": _cmd_serve, "worker": _cmd_worker}
    try:
        if args.command == "models":
            return _cmd_models_prepare(args)
        return handlers[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
