"""`llmkit` as the CLI runs it, with each process writing down (to the file $RANK_SPY) whether it trained a
tokenizer and a digest of the tokenizer it built its model with: test_distributed launches it with torchrun to
see that only rank 0 trains one and every rank uses the same."""

import hashlib
import os
import sys

from llmkit import loading, tokenizer
from llmkit.cli import main


def record(line: str) -> None:
    with open(os.environ["RANK_SPY"], "a", encoding="utf-8") as spy:
        spy.write(f"{os.environ.get('RANK', '0')} {line}\n")


def spied(function, note):
    def wrapper(*args, **kwargs):
        record(note(*args, **kwargs))
        return function(*args, **kwargs)
    return wrapper


def digest(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()


tokenizer.train_tokenizer = spied(tokenizer.train_tokenizer, lambda *args, **kwargs: "trained a tokenizer")
loading.build_model = spied(loading.build_model, lambda recipe, tok: f"model built with tokenizer {digest(tok)}")

if __name__ == "__main__":
    sys.argv[0] = "llmkit"
    main()
