"""The gene vocabulary of `data_prep.prepare_omics`: genes as (symbol, Ensembl id) with ids 2..
(0 = padding, 1 = CLS), built from the inputs (sorted by name) or read from a previous run's
vocab.tsv (--vocab), and each table's features mapped to their gene's id."""

from __future__ import annotations

import numpy as np

from cfm.data.omics_records import CLS_ID, PAD_ID
from cfm.data.omics_source import read_vocab
from data_prep.omics_files import OmicsInputError, log


class Vocab:
    """Genes as (symbol, Ensembl id); matched by Ensembl id where known, else by symbol."""

    def __init__(self, rows: list[tuple[str, str]] = (), frozen: bool = False):
        self.symbols, self.ensembl, self.frozen = [], [], frozen
        self.by_ens, self.by_sym = {}, {}
        for sym, ens in rows:
            self._add(sym, ens)

    def _add(self, sym: str, ens: str) -> int:
        idx = len(self.symbols)
        self.symbols.append(sym)
        self.ensembl.append(ens)
        if ens:
            self.by_ens[ens] = idx
        if sym:
            self.by_sym.setdefault(sym, []).append(idx)
        return idx

    def lookup(self, sym: str, ens: str) -> int | None:
        """Gene id (2..) of (symbol, ensembl), or None; ValueError if a bare symbol is
        ambiguous (two Ensembl ids share it)."""
        if ens and ens in self.by_ens:
            return self.by_ens[ens] + 2
        candidates = self.by_sym.get(sym, []) if sym else []
        if ens:
            candidates = [c for c in candidates if not self.ensembl[c]]
        if len(candidates) > 1:
            raise OmicsInputError(f"gene symbol {sym!r} is ambiguous: it names Ensembl ids "
                                  f"{[self.ensembl[c] for c in candidates]}")
        if candidates:
            if ens and not self.frozen:
                self.ensembl[candidates[0]] = ens
                self.by_ens[ens] = candidates[0]
            return candidates[0] + 2
        return None

    def add(self, sym: str, ens: str) -> int:
        return self.lookup(sym, ens) or self._add(sym, ens) + 2

    def sorted(self) -> "Vocab":
        """The same genes ordered by name (symbol, else Ensembl id): ids independent of input
        order."""
        order = sorted(range(len(self.symbols)),
                       key=lambda i: (self.symbols[i] or self.ensembl[i], self.ensembl[i]))
        return Vocab([(self.symbols[i], self.ensembl[i]) for i in order], frozen=True)

    def tsv(self) -> bytes:
        lines = ["id\tsymbol\tensembl", f"{PAD_ID}\t<pad>\t", f"{CLS_ID}\t<cls>\t"]
        lines += [f"{i + 2}\t{s}\t{e}" for i, (s, e) in enumerate(zip(self.symbols,
                                                                       self.ensembl))]
        return ("\n".join(lines) + "\n").encode("utf-8")

    def __len__(self) -> int:
        return len(self.symbols) + 2


def map_genes(tables, vocab: Vocab, drop_unknown: bool, repairs: dict) -> list[np.ndarray]:
    """Per table: gene id of every feature (unknown genes dropped or an error)."""
    out = []
    for table in tables:
        ids = np.array([vocab.lookup(s, e) or 0 for s, e in zip(table.symbols, table.ensembl)],
                       np.int64)
        unknown = np.flatnonzero(ids == 0)
        if len(unknown):
            if not drop_unknown:
                raise OmicsInputError(f"{table.path}: {len(unknown)} gene(s) not in --vocab, "
                                      f"first {table.names[unknown[0]]!r} (column/row "
                                      f"{table.gene_lines[unknown[0]]}); add "
                                      "--drop-unknown-genes to drop them")
            before = set(table.modalities())
            table.drop_features(ids != 0)
            ids = ids[ids != 0]
            repairs["unknown genes dropped (features)"] = (
                repairs.get("unknown genes dropped (features)", 0) + len(unknown))
            log(f"{table.name}: dropped {len(unknown)} feature(s) of genes not in --vocab")
            lost = before - set(table.modalities())
            if lost:
                raise OmicsInputError(f"{table.path}: no {sorted(lost)} gene is in --vocab "
                                      "(modality empty after dropping unknown genes)")
        out.append(ids)
    return out


def build_vocab(args, tables) -> Vocab:
    """--vocab, or every gene of the inputs sorted by name."""
    if args.vocab:
        try:
            return Vocab(read_vocab(args.vocab), frozen=True)
        except ValueError as err:
            raise OmicsInputError(str(err)) from err
    vocab = Vocab()
    for table in tables:
        for sym, ens in zip(table.symbols, table.ensembl):
            vocab.add(sym, ens)
    return vocab.sorted()
