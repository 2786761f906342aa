"""``smallmind documents``: document libraries from the command line (the window's Tools → Documents).

    smallmind documents add notes ~/notes ~/papers/survey.pdf   # create or extend, then index
    smallmind documents update [notes]                          # read what changed (all libraries)
    smallmind documents list                                    # libraries, counts, sources
    smallmind documents search notes "when was the bridge built?" [--budget 1000]
    smallmind documents remove notes [PATH...]                  # the library, or some of its sources

The index is the app's (``default_index_path()``, moved by SMALLMIND_HOME), so ``smallmind serve``
and the window see the same libraries.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from engine.documents.indexing import IndexProgress, UpdateReport, update_library
from engine.documents.retrieval import DEFAULT_BUDGET_TOKENS, retrieve
from engine.documents.store import DocumentIndex


def add_documents_parser(commands: argparse._SubParsersAction, verbose: argparse.ArgumentParser) -> None:
    documents = commands.add_parser("documents", parents=[verbose], help="document libraries to cite")
    actions = documents.add_subparsers(dest="documents_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add folders or files to a library (made if new), then index")
    add.add_argument("library")
    add.add_argument("paths", nargs="+", metavar="PATH")
    update = actions.add_parser("update", help="index what changed (every library when none is named)")
    update.add_argument("library", nargs="?")
    actions.add_parser("list", help="the libraries, their counts and sources")
    search = actions.add_parser("search", help="the passages a question would be given")
    search.add_argument("library")
    search.add_argument("question")
    search.add_argument("--budget", type=int, default=DEFAULT_BUDGET_TOKENS, help="tokens of passages")
    remove = actions.add_parser("remove", help="remove a library, or some of its folders and files")
    remove.add_argument("library")
    remove.add_argument("paths", nargs="*", metavar="PATH")
    documents.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from engine.documents import default_index_path

    out = out or sys.stdout
    try:
        with DocumentIndex(default_index_path()) as index:
            _run(index, args, out)
    except ValueError as exc:  # a bad library name or budget, in the user's words
        print(f"smallmind: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _run(index: DocumentIndex, args: argparse.Namespace, out: TextIO) -> None:
    command = args.documents_command
    if command == "add":
        if args.library not in index.library_names():
            index.create_library(args.library)
        index.add_sources(args.library, args.paths)
        _update(index, [args.library], out)
    elif command == "update":
        _update(index, [args.library] if args.library else index.library_names(), out)
    elif command == "list":
        for info in index.libraries():
            out.write(f"{info.name}: {info.n_files} files, {info.n_passages} passages, "
                      f"{info.n_skipped} skipped\n")  # fmt: skip
            out.writelines(f"  {source}\n" for source in info.sources)
    elif command == "search":
        found = retrieve(index, [args.library], args.question, args.budget)
        for c in found.passages:
            out.write(f"[{c.number}] {c.label} ({c.n_tokens} tokens)\n{c.text}\n\n")
        out.write(f"{len(found.passages)} passages, {found.n_tokens} of {found.budget_tokens} tokens\n")
    elif command == "remove":
        if args.paths:
            index.remove_sources(args.library, [_absolute(p) for p in args.paths])
        else:
            index.delete_library(args.library)


def _update(index: DocumentIndex, names: list[str], out: TextIO) -> None:
    for name in names:

        def show(progress: IndexProgress, name: str = name) -> None:
            if progress.n_done % 200 == 0 and progress.n_total:
                out.write(f"{name}: {progress.n_done}/{progress.n_total} files\r")
                out.flush()

        out.write(_summary(update_library(index, name, progress=show)))


def _summary(report: UpdateReport) -> str:
    lines = [f"{report.library}: {report.n_files} files ({report.n_read} read, {report.n_unchanged} "
             f"unchanged, {report.n_removed} removed), {report.n_passages} new passages, "
             f"{len(report.skipped)} skipped, {report.elapsed_s:.1f} s"]  # fmt: skip
    lines += [f"  skipped {s.path}: {s.reason}" for s in report.skipped]
    return "\n".join(lines) + "\n"


def _absolute(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))
