# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""`qilin-med-vl push`: assemble a Hub repo (model, remote code, processor, hia/ adapter, model card) and upload it."""

from ..hub import CARD_REPO_IDS, push_to_hub


def run(args) -> int:
    result = push_to_hub(
        args.model,
        args.repo_id,
        adapter=args.adapter,
        card=args.card,
        base_model=args.base_model,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        token=args.token,
        commit_message=args.commit_message,
        assembled=args.assembled,
        include=args.include or (),
        announce=lambda pending: print(pending.summary(uploading=True), flush=True),
    )
    print(result.summary() if result.dry_run else f"uploaded; commit: {result.commit_url}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="assemble a Hub repo (model, remote code, processor, hia/ adapter, model card) and upload it",
    )
    parser.add_argument("model", help="saved Qilin-Med-VL folder (e.g. the output of `convert`)")
    parser.add_argument("repo_id", help="target repo, e.g. my-org/Qilin-Med-VL-HiA")
    parser.add_argument("--adapter", help="saved HiA adapter folder, published as hia/ (default: MODEL/hia, if any)")
    parser.add_argument("--card", help=f"model card: {', '.join(CARD_REPO_IDS)} or a markdown file "
                                       "(default: qilin-med-vl-hia with an adapter, else qilin-med-vl)")
    parser.add_argument("--base-model", help="override the card's base_model metadata")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="branch to push to (created if needed)")
    parser.add_argument("--dry-run", action="store_true", help="assemble and list what would be sent; upload nothing")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--assembled", help="keep the assembled repo folder here (a new folder; not with --dry-run)")
    parser.add_argument("--include", action="append", metavar="PATTERN",
                        help="also upload files of the model folder matching this glob (e.g. 'checkpoint-*/*'); "
                             "by default only weights, configs, tokenizer/processor files, remote code and "
                             "adapters go")
    parser.set_defaults(handler=run)
