"""CUDA source -> host C++ for sm90_emu.h: a mechanical rewrite of three constructs only.

* ``asm volatile("PTX" : outputs : inputs : clobbers);`` becomes a call of the emulator's PTX
  interpreter with the statement's own PTX text and operands, in GCC's numbering:
  ``{ static const ::emu::Prog* p = ::emu::compile("PTX"); ::emu::Op o[] = {...};
  ::emu::exec(*p, o, n); }`` (``"+x"`` operands by reference and read, ``"=x"`` by reference,
  the others by value).
* ``kernel<<<grid, block, smem, stream>>>(args);`` (also ``kernel<T><<<...>>>``) becomes
  ``::emu::launch(kernel, grid, block, smem, stream, args);``.
* ``extern __shared__ T smem_raw[];`` becomes ``T* const smem_raw = reinterpret_cast<T*>(
  ::emu::cta_smem());``: the executing CTA's shared memory (a cluster's CTAs run together, each
  in its own buffer).

Everything else of the source is left as it is (line numbers too: each rewrite keeps the
newlines it replaces).
"""

from __future__ import annotations

import re

__all__ = ["emulated_source", "SourceError"]


class SourceError(ValueError):
    pass


def _skip_literal(text: str, i: int) -> int:
    """i at a quote: the index after the string or character literal."""
    q = text[i]
    i += 1
    while i < len(text) and text[i] != q:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _match_paren(text: str, i: int) -> int:
    """i at '(': the index of its matching ')'."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_literal(text, i)
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise SourceError("unbalanced parentheses")


def _split_top(text: str, sep: str):
    """Split at sep outside literals and brackets."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            i = _skip_literal(text, i)
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


_OPERAND = re.compile(r'^\s*"([^"]*)"\s*\((.*)\)\s*$', re.S)


def _asm_call(body: str) -> str:
    sections = _split_top(body, ":")
    template = sections[0].strip()
    if not template.startswith('"'):
        raise SourceError(f"asm template is not a string literal: {template[:60]!r}")
    ops = []
    for sec in sections[1:3]:
        for operand in _split_top(sec, ","):
            if not operand.strip():
                continue
            m = _OPERAND.match(operand)
            if m is None:
                raise SourceError(f"cannot parse asm operand {operand.strip()!r}")
            constraint, expr = m.group(1), m.group(2).strip()
            kind = "inout" if constraint.startswith("+") else "out" if constraint.startswith("=") else "in"
            ops.append(f"::emu::{kind}({expr})")
    template = " ".join(line.strip() for line in template.splitlines())
    if ops:
        return ("{ static const ::emu::Prog* emu_prog_ = ::emu::compile(" + template + "); ::emu::Op emu_ops_[] = {"
                + ", ".join(ops) + f"}}; ::emu::exec(*emu_prog_, emu_ops_, {len(ops)}); }}")
    return "{ static const ::emu::Prog* emu_prog_ = ::emu::compile(" + template + "); ::emu::exec(*emu_prog_, nullptr, 0); }"


def _launch_call(kernel: str, config: str, args: str) -> str:
    cfg = [c.strip() for c in _split_top(config, ",")]
    if not 2 <= len(cfg) <= 4:
        raise SourceError(f"launch configuration {config!r}")
    cfg += ["0", "nullptr"][len(cfg) - 2:]
    if cfg[3] == "nullptr":
        cfg[3] = "static_cast<cudaStream_t>(nullptr)"
    rest = (", " + args.strip()) if args.strip() else ""
    return f"::emu::launch({kernel}, {', '.join(cfg)}{rest})"


def _template_args(text: str, j: int):
    """j just after an identifier: the end of a template argument list `<...>` there when a launch's
    `<<<` follows it, else None (a comparison, a shift, a plain launch)."""
    m = re.match(r"\s*<(?!<)", text[j:])
    if m is None:
        return None
    k, depth = j + m.end(), 1
    while k < len(text) and depth > 0:
        c = text[k]
        if c in ";{}":
            return None
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        k += 1
    if depth == 0 and re.match(r"\s*<<<", text[k:]):
        return k
    return None


_SMEM_DECL = re.compile(r"extern[ \t]+__shared__[ \t]+(?:__align__\(\d+\)[ \t]+)?"
                        r"([A-Za-z_][\w:]*(?:[ \t]+[A-Za-z_]\w*)?)[ \t]+smem_raw[ \t]*\[[ \t]*\][ \t]*;")


def emulated_source(text: str) -> str:
    text = _SMEM_DECL.sub(lambda m: f"{m.group(1)}* const smem_raw = reinterpret_cast<{m.group(1)}*>(::emu::cta_smem());",
                          text)
    out, i, n = [], 0, len(text)
    ident = re.compile(r"[A-Za-z_]\w*")
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            i = j
            continue
        if text.startswith("/*", i):
            j = text.index("*/", i) + 2
            out.append(text[i:j])
            i = j
            continue
        if c in "\"'":
            j = _skip_literal(text, i)
            out.append(text[i:j])
            i = j
            continue
        m = ident.match(text, i)
        if m is None:
            out.append(c)
            i += 1
            continue
        word, j = m.group(0), m.end()
        if word == "asm" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            k = j
            rest = re.match(r"\s*(?:volatile\b|__volatile__\b)?\s*", text[k:])
            k += rest.end()
            if k < n and text[k] == "(":
                close = _match_paren(text, k)
                semi = re.match(r"\s*;", text[close + 1:])
                if semi is None:
                    raise SourceError("asm statement without ';'")
                end = close + 1 + semi.end()
                original = text[i:end]
                out.append(_asm_call(text[k + 1:close]) + "\n" * original.count("\n"))
                i = end
                continue
        targs = _template_args(text, j)  # kernel<PACK><<<...>>>: the instantiation's arguments
        if targs is not None:
            word, j = word + text[j:targs], targs
        launch = re.match(r"\s*<<<", text[j:])
        if launch is not None:
            cfg_start = j + launch.end()
            cfg_end = text.index(">>>", cfg_start)
            k = cfg_end + 3
            ws = re.match(r"\s*", text[k:])
            k += ws.end()
            if text[k] != "(":
                raise SourceError("launch without arguments")
            close = _match_paren(text, k)
            original = text[i:close + 1]
            out.append(_launch_call(word, text[cfg_start:cfg_end], text[k + 1:close]) + "\n" * original.count("\n"))
            i = close + 1
            continue
        out.append(word)
        i = j
    return "".join(out)
