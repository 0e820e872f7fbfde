"""Character-level text corpora as windows of tokens, for next-token language models.

`load(name, context=T)` returns a ``pfa_jax.app.data.Dataset`` whose "images" are int32 token
windows ``(N, T)`` and whose labels are the same windows shifted by one character ``(N, T)`` (the
next character at each position), for one of `CORPORA`:

- ``fortunes``: the English cookies of Debian's ``fortunes`` and ``fortunes-min`` packages
  (``apt-get install -y fortunes fortunes-min``: about 2.8 MB of quotations, jokes, definitions
  and verse in ``/usr/share/games/fortunes``; BSD-licensed, in Debian main, no download at run
  time). Chosen because it is the largest English prose a stock Debian mirror installs as plain
  text without network access at training time. Every file of the directory (or ``data_dir``) is
  read in sorted name order except the ``.dat`` indexes and the ``.u8`` links; a file's cookies are
  separated by lines holding only ``%``. **Split**: the cookies are numbered in that order and every
  tenth (numbers 9, 19, 29, ...) goes to the test split, the rest to training; each split is the
  text of its cookies, each followed by ``"\\n%\\n"`` as in the files.
- ``tiny_shakespeare`` (tensorflow-datasets, where users have internet or a prepared copy): its
  ``train`` split for training and ``test`` for the test split (tfds's fixed 90 / 5 / 5 cut of
  Karpathy's 1 MB file).

**Vocabulary** (`VOCABULARY`, 98 tokens, the same for every corpus): token 0 stands for any
character outside it (control characters, non-ASCII letters: 0.02 % of ``fortunes``), token 1 is
``"\\t"`` (fortunes indent attributions with tabs), token 2 ``"\\n"``, tokens 3 to 97 the printable
ASCII characters ``' '`` to ``'~'`` in code order. `encode` and `decode` convert.

**Windows**: a split of ``L`` tokens gives ``(L - 1) // T`` windows, window ``i`` holding tokens
``i T .. i T + T - 1`` and labels ``i T + 1 .. i T + T``, so every token but the first is predicted
once per epoch, from the up to ``T - 1`` tokens before it in its window. ``limit=n`` keeps the
first ``n`` windows of each split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pfa_jax.app import data

__all__ = ["CORPORA", "decode", "DEFAULT_FORTUNES_DIR", "encode", "fortune_cookies", "load",
           "VOCABULARY", "windows"]

CORPORA = ("fortunes", "tiny_shakespeare")
DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
UNKNOWN = "\0"  # token 0's character in `VOCABULARY`: any character outside it
VOCABULARY = UNKNOWN + "\t\n" + "".join(chr(c) for c in range(32, 127))
_SEPARATOR = "\n%\n"
_TEST_EVERY = 10
_CODES = np.zeros(0x110000, np.int32)
_CODES[[ord(c) for c in VOCABULARY[1:]]] = np.arange(1, len(VOCABULARY))


def encode(text: str) -> np.ndarray:
    """The int32 tokens of ``text`` (`VOCABULARY`; characters outside it become token 0).

    Example:
      >>> encode("Hi!\\n").tolist()
      [43, 76, 4, 2]
    """
    return _CODES[np.frombuffer(text.encode("utf-32-le"), np.uint32)]


def decode(tokens) -> str:
    """The text of ``tokens`` (token 0 shown as ``"\\0"``).

    Example:
      >>> decode(encode('fa\\x07kp'))
      'fa\\x00kp'
    """
    return "".join(VOCABULARY[t] for t in np.asarray(tokens).ravel())


def windows(tokens: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, next tokens)``, each ``((len(tokens) - 1) // context, context)`` (module
    docstring).

    Example:
      >>> inputs, labels = windows(np.arange(7), 3)
      >>> inputs.tolist(), labels.tolist()
      ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]])
    """
    count = (len(tokens) - 1) // context
    if count < 1:
        raise ValueError(f"a text of {len(tokens)} tokens holds no window of context={context} "
                         "plus the next token: use a smaller context")
    cut = count * context
    return (tokens[:cut].reshape(count, context).astype(np.int32),
            tokens[1:cut + 1].reshape(count, context).astype(np.int32))


def fortune_cookies(directory: str | None = None) -> list[str]:
    """Every cookie of the fortune files in ``directory`` (default `DEFAULT_FORTUNES_DIR`), in
    sorted file order, each without its ``%`` line; errors say how to install them."""
    directory = Path(directory or DEFAULT_FORTUNES_DIR)
    files = sorted(p for p in directory.glob("*") if p.is_file() and not p.is_symlink()
                   and p.suffix not in (".dat", ".u8")) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no fortune files in {directory}: install them with `apt-get install -y fortunes "
            "fortunes-min` (Debian, Ubuntu) or pass a directory of fortune files as data_dir")
    cookies = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        cookies += [c.strip("\n") for c in text.split(_SEPARATOR.lstrip("\n"))
                    if c.strip("\n")]
    return cookies


def _fortunes(data_dir: str | None) -> tuple[str, str]:
    cookies = fortune_cookies(data_dir)
    test = [c for i, c in enumerate(cookies) if i % _TEST_EVERY == _TEST_EVERY - 1]
    train = [c for i, c in enumerate(cookies) if i % _TEST_EVERY != _TEST_EVERY - 1]
    return tuple("".join(c + _SEPARATOR for c in split) for split in (train, test))


def _tiny_shakespeare(data_dir: str | None) -> tuple[str, str]:
    sources = data.tfds_sources("tiny_shakespeare", data_dir)
    return tuple(source[0]["text"].decode("utf-8") if isinstance(source[0]["text"], bytes)
                 else str(source[0]["text"]) for source in sources)


def load(name: str, *, context: int = 128, data_dir: str | None = None,
         limit: int | None = None) -> data.Dataset:
    """The corpus ``name`` (one of `CORPORA`) as windows of ``context`` tokens (module docstring).

    Returns a ``data.Dataset`` with int32 ``train_images`` / ``test_images`` ``(N, context)``,
    ``train_labels`` / ``test_labels`` ``(N, context)`` (the next tokens) and ``num_classes`` the
    vocabulary size; ``mean`` and ``std`` are 0 and 1 (tokens are not standardised).
    """
    readers = {"fortunes": _fortunes, "tiny_shakespeare": _tiny_shakespeare}
    if name not in readers:
        raise ValueError(f"unknown text corpus {name!r}; valid names: {', '.join(CORPORA)}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of windows, got {limit!r}")
    (train, train_next), (test, test_next) = (
        (x[:limit], y[:limit]) for x, y in (windows(encode(t), context)
                                            for t in readers[name](data_dir)))
    return data.Dataset(name=name, train_images=train, train_labels=train_next,
                        test_images=test, test_labels=test_next, num_classes=len(VOCABULARY),
                        mean=(0.0,), std=(1.0,))
