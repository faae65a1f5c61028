#!/usr/bin/env python3
"""Build a small English prose corpus from the CPython 3.11 documentation.

Usage:
    python make_corpus.py SOURCES_DIR [OUT_DIR]

SOURCES_DIR is the Sphinx ``_sources`` folder of the Debian package
python3.11-doc (``usr/share/doc/python3.11/html/_sources``).  OUT_DIR
defaults to the folder of this script.  Writes ``train.txt`` and
``valid.txt``: one prose paragraph per line, reStructuredText markup removed.

The output is deterministic: files are read in sorted order, the train/valid
split is by source file (every VALID_EVERY-th file goes to valid), repeated
paragraphs are kept only once, and nothing random is used.  Standard library
only.
"""
import os
import re
import sys

VALID_EVERY = 20       # file number k (in sorted order) goes to valid if k % 20 == VALID_OFFSET
VALID_OFFSET = 10
MAX_TRAIN_CHARS = 6_500_000   # whole files are kept until this budget is reached
MAX_VALID_CHARS = 350_000
MIN_WORDS = 8          # shorter paragraphs are dropped
MIN_WORD_SHARE = 0.7   # share of tokens that must look like English words
MIN_LETTER_SHARE = 0.75   # share of non-space characters that must be letters

# Legal text, tables of contents and changelogs are not prose we want.
EXCLUDE_DIRS = ("whatsnew/",)
EXCLUDE_FILES = {"license.rst.txt", "copyright.rst.txt", "contents.rst.txt"}

# Directives whose header (signature/arguments/options) is dropped but whose
# indented body is prose.  All directives not listed here are skipped whole
# (code-block, doctest, index, toctree, tables, productionlist, ...).
BODY_DIRECTIVES = {
    "function", "method", "classmethod", "staticmethod", "abstractmethod",
    "coroutinefunction", "coroutinemethod", "awaitablefunction",
    "awaitablemethod", "decorator", "class", "exception", "attribute", "data",
    "describe", "object", "opcode", "cmdoption", "option", "envvar",
    "pdbcommand", "2to3fixer", "glossary", "topic", "sidebar", "epigraph",
    "only", "c:function", "c:member", "c:type", "c:var", "c:macro", "c:struct",
}
# Directives whose text after "::" on the header line is already body text.
ADMONITIONS = {"note", "warning", "seealso", "impl-detail", "important",
               "caution", "tip", "hint", "attention", "danger", "error"}
# Version notes: header is ".. versionchanged:: 3.2 optional text".
VERSION_DIRECTIVES = {"versionadded": 1, "versionchanged": 1, "deprecated": 1,
                      "deprecated-removed": 2}

# Roles naming Python/C objects, for which a leading "~" shows the last name only.
OBJECT_ROLES = {"func", "meth", "class", "mod", "exc", "attr", "data", "const",
                "obj", "member", "type", "macro", "var", "struct", "expr"}

DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::(.*)$")
FOOTNOTE = re.compile(r"\.\.\s+\[[^\]]+\]\s*(.*)$")
LABEL = re.compile(r"\.\. _([^:]+):\s*$")
ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1{2,}\s*$")
GRID_TABLE = re.compile(r"\+[-=+]+\+\s*$")
SIMPLE_TABLE = re.compile(r"=+( +=+)+\s*$")
BULLET = re.compile(r"([-*+\u2022]|#\.|\d+[.)]|\(\d+\))\s+")
FIELD = re.compile(r":[^:`]+:(\s+|$)")

INLINE = re.compile(r"""
    (?<![\w`]):(?P<role>[A-Za-z][\w+.-]*(?::[A-Za-z][\w+.-]*)?):
        `(?P<rtext>(?:\\.|[^`\\])+)`(?:__?)?
  | ``(?P<lit>\S(?:.*?\S)??)``(?!`)
  | `(?P<itext>(?:\\.|[^`\\])+)`(?:__?)?
  | (?<![\w*\\])\*\*(?P<strong>(?:\\.|[^\s*\\])(?:(?:\\.|[^\\])*?(?:\\.|[^\s\\]))?)\*\*(?![\w*])
  | (?<![\w*\\])\*(?P<emph>(?:\\.|[^\s*\\])(?:(?:\\.|[^*\\])*?(?:\\.|[^\s\\]))?)\*(?![\w*])
  | \|(?P<subst>\w[\w .-]*)\|(?:__?)?
  | \s?\[(?:\#[\w-]*|\d+|\*|[A-Za-z][\w.-]*)\]_(?!\w)
  | (?<![\w`\\.-])(?P<ref>[A-Za-z][\w.-]*[A-Za-z0-9])__?(?![\w])
""", re.X)
EXPLICIT = re.compile(r"(.*?)\s*(?<!\\)<([^<>]+)>$", re.S)   # "title <target>"
UNRESOLVED = "\x00"   # marks a paragraph that must be dropped
WORD = re.compile(r"[(\"']?[A-Za-z]+(['-][A-Za-z]+)*[)\"']?[.,;:!?]?[)\"']?")   # an English-looking word


def indent_of(line):
    return len(line) - len(line.lstrip(" "))


def unescape(text):
    text = re.sub(r"\\\s", "", text)            # "\ " is an invisible separator
    return re.sub(r"\\(.)", r"\1", text)


def role_text(role, text, titles):
    """Plain-text rendering of :role:`text`."""
    role = role.split(":")[-1].lower()
    m = EXPLICIT.match(text)
    if m and m.group(1):                       # explicit title: "title <target>"
        return unescape(m.group(1))
    if m:
        text = m.group(2)
    text = unescape(text)
    if role in ("ref", "doc"):
        return titles.get(text.lower(), UNRESOLVED)
    if text.startswith("!"):
        text = text[1:]
    if role == "token":
        return text.rsplit(":", 1)[-1]
    if role in OBJECT_ROLES:                   # Sphinx drops a leading "." too
        text = text.lstrip(".")
    if text.startswith("~") and role in OBJECT_ROLES:
        text = text[1:].rsplit(".", 1)[-1]
    if role == "pep":
        return "PEP " + text.split("#")[0]
    if role == "rfc":
        return "RFC " + text.split("#")[0]
    if role == "issue":
        return "bpo-" + text
    if role == "gh":
        return "gh-" + text
    if role in ("file", "samp"):
        return text.replace("{", "").replace("}", "")
    if role == "menuselection":
        return text.replace("-->", ">")
    if role == "guilabel":
        return text.replace("&", "")
    return text


def inline_to_text(text, titles):
    """Replace reST inline markup by the text a reader would see."""
    out, pos = [], 0
    for m in INLINE.finditer(text):
        out.append(unescape(text[pos:m.start()]))
        pos = m.end()
        g = m.groupdict()
        if g["role"]:
            out.append(role_text(g["role"], g["rtext"], titles))
        elif g["lit"] is not None:
            out.append(g["lit"])
        elif g["itext"] is not None:
            t = g["itext"]
            link = EXPLICIT.match(t)
            if link:
                t = link.group(1) or link.group(2)
            out.append(unescape(t))
        elif g["strong"] is not None:              # reST does not nest markup
            out.append(unescape(g["strong"]))
        elif g["emph"] is not None:
            out.append(unescape(g["emph"]))
        elif g["subst"] is not None:
            out.append("")                     # |version|, |release|, ...
        elif g["ref"] is not None:
            out.append(g["ref"])               # reference_ -> reference
        else:
            out.append("")                     # footnote/citation reference
    out.append(unescape(text[pos:]))
    return "".join(out)


def is_title(lines, i):
    """True if lines[i] is a section title underlined by lines[i+1]."""
    if i + 1 >= len(lines) or not lines[i].strip() or ADORNMENT.match(lines[i]):
        return False
    overlined = i > 0 and ADORNMENT.match(lines[i - 1])     # inset title allowed
    return bool(ADORNMENT.match(lines[i + 1]) and (overlined or lines[i][0] != " "))


def collect_titles(files):
    """Map ".. _label:" targets that precede a section title to that title,
    so that :ref:`label` can be rendered the way Sphinx renders it."""
    titles = {}
    for rel, lines in files:
        pending = []
        for i, line in enumerate(lines):
            m = LABEL.match(line)
            if m:
                pending.append(m.group(1).lower())
            elif not line.strip() or ADORNMENT.match(line):
                continue
            else:
                if pending and is_title(lines, i):
                    title = inline_to_text(line.strip(), {})
                    for label in pending:
                        titles[label] = title
                pending = []
        # :doc: targets are document paths; their title is the first heading
        doc = rel[:-len(".rst.txt")]
        for i in range(len(lines)):
            if is_title(lines, i):
                titles.setdefault(doc, inline_to_text(lines[i].strip(), {}))
                titles.setdefault("/" + doc, titles[doc])
                break
    return titles


def skip_block(lines, i, base):
    """Index of the first line after lines[i:] that is indented <= base."""
    while i < len(lines) and (not lines[i].strip() or indent_of(lines[i]) > base):
        i += 1
    return i


def kept_lines(lines):
    """First pass: yield (indent, text) for lines that may be prose and None
    for paragraph breaks; skip titles, tables, literal blocks and directives."""
    i, n = 0, len(lines)
    literal_base = None          # indent of a paragraph that ended with "::"
    after_blank = False
    while i < n:
        line = lines[i]
        s = line.strip()
        if not s:
            yield None
            after_blank = True
            i += 1
            continue
        ind = indent_of(line)
        if after_blank and literal_base is not None and ind > literal_base:
            i = skip_block(lines, i, literal_base)       # literal block
            literal_base = None
            continue
        after_blank = False
        literal_base = None
        if (ind == 0 and ADORNMENT.match(line)) or is_title(lines, i):
            i += 1 if ADORNMENT.match(line) else 2       # heading / transition
            yield None
        elif GRID_TABLE.match(s) or SIMPLE_TABLE.match(s):
            i = skip_table(lines, i)
            yield None
        elif s.startswith("| ") or s == "|":             # line block
            i += 1
        elif s.startswith(".. ") or s == "..":
            yield None
            i, text = explicit_markup(lines, i, ind, s)
            if text:
                yield (ind + 3, text)
                literal_base = ind if text.endswith("::") else None
        else:
            literal_base = ind if s.endswith("::") else None
            yield (ind, s)
            i += 1


def explicit_markup(lines, i, ind, s):
    """Handle a ".. " construct starting at lines[i].  Return the index of the
    next line to read and the body text that starts on the header line (with
    its continuation lines), if any."""
    m = DIRECTIVE.match(s)
    name = m.group(1).lower() if m else None
    if name and name.startswith("py:"):
        name = name[3:]
    if name in BODY_DIRECTIVES:
        i += 1
        while i < len(lines) and lines[i].strip():       # signature lines, options
            i += 1
        return i, None
    f = FOOTNOTE.match(s)
    if name in ADMONITIONS or name in VERSION_DIRECTIVES:
        nargs = VERSION_DIRECTIVES.get(name, 0)          # drop the version number(s)
        words = m.group(2).split(None, nargs)
        text = words[nargs] if len(words) > nargs else ""
    elif f and not name:                                 # footnote: keep its text
        text = f.group(1)
    else:   # comments, labels, substitutions, code and every other directive
        return skip_block(lines, i + 1, ind), None
    i += 1
    while i < len(lines) and lines[i].strip() and indent_of(lines[i]) > ind:
        text += " " + lines[i].strip()                  # continuation lines
        i += 1
    return i, text.strip()


def skip_table(lines, i):
    """Index of the line after the grid or simple table starting at lines[i]."""
    if GRID_TABLE.match(lines[i].strip()):
        while i < len(lines) and lines[i].strip()[:1] in ("+", "|"):
            i += 1
        return i
    i += 1                          # simple table: up to a border before a blank line
    while i < len(lines):
        border = SIMPLE_TABLE.match(lines[i].strip())
        i += 1
        if border and (i >= len(lines) or not lines[i].strip()):
            break
    return i


def paragraphs(lines):
    """Second pass: group kept lines into paragraphs (lists of lines)."""
    cur, cur_indent, bullet_indent = [], None, None
    for item in kept_lines(lines):
        if item is None:
            if cur:
                yield cur
            cur, bullet_indent = [], None
            continue
        ind, s = item
        field = FIELD.match(s)
        if field:                               # ":Author: ..." / ":param x: ...": own paragraph
            if cur:
                yield cur
            rest = s[field.end():]
            cur, cur_indent, bullet_indent = ([rest] if rest else []), ind + field.end(), None
            continue
        b = BULLET.match(s)
        # A list item starts a paragraph; inside a paragraph a line starting
        # with "-" or "1." is only an item if it continues a list.
        if b and (not cur or ind == bullet_indent):
            if cur:
                yield cur
            cur, cur_indent, bullet_indent = [s[b.end():]], ind + b.end(), ind
        elif cur and ind == cur_indent:
            cur.append(s)
        else:                                   # indentation change: new paragraph
            if cur:
                yield cur
            cur, cur_indent, bullet_indent = [s], ind, None
    if cur:
        yield cur


def clean(par, titles):
    """Turn a paragraph into one plain line, or None if it is not prose."""
    text = " ".join(par)
    if text.startswith(">>>"):
        return None
    if text.endswith("::"):                     # "For example::" -> "For example:"
        text = text[:-2].rstrip() if text[:-2].endswith(" ") or text == "::" \
            else text[:-1]
    text = inline_to_text(text, titles)
    text = " ".join(text.split())
    if UNRESOLVED in text or not looks_like_prose(text):
        return None
    return text


def looks_like_prose(text):
    """Enough words, no leftover markup, and not mostly code or symbols."""
    words = text.split()
    if len(words) < MIN_WORDS:
        return False
    if "`" in text or re.search(r"(^|\s)\.\.\s|:\w+:`|>>>", text):
        return False                            # markup we failed to remove
    plain = sum(1 for w in words if WORD.fullmatch(w))
    letters = sum(c.isalpha() for c in text)
    visible = sum(not c.isspace() for c in text)
    return plain >= MIN_WORD_SHARE * len(words) and letters >= MIN_LETTER_SHARE * visible


def read_sources(src):
    """Sorted list of (relative path, lines) for every *.rst.txt file."""
    files = []
    for root, dirs, names in os.walk(src):
        for name in names:
            if name.endswith(".rst.txt"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, src).replace(os.sep, "/")
                with open(path, encoding="utf-8") as f:
                    lines = f.read().expandtabs(8).splitlines()
                files.append((rel, [l.rstrip() for l in lines]))
    files.sort()
    return files


def main(argv):
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    src = argv[1]
    out_dir = argv[2] if len(argv) == 3 else os.path.dirname(os.path.abspath(__file__))
    files = read_sources(src)
    titles = collect_titles(files)
    files = [(rel, lines) for rel, lines in files
             if not rel.startswith(EXCLUDE_DIRS) and rel not in EXCLUDE_FILES]
    splits = {"train": [], "valid": []}
    budget = {"train": MAX_TRAIN_CHARS, "valid": MAX_VALID_CHARS}
    used = {"train": 0, "valid": 0}
    seen = set()        # exact duplicates are kept once, so valid never repeats train
    for k, (rel, lines) in enumerate(files):
        docs = [t for t in (clean(p, titles) for p in paragraphs(lines)) if t]
        docs = [d for d in dict.fromkeys(docs) if d not in seen]
        size = sum(len(d) + 1 for d in docs)
        name = "valid" if k % VALID_EVERY == VALID_OFFSET else "train"
        if docs and used[name] + size <= budget[name]:   # keep whole files only
            splits[name].extend(docs)
            used[name] += size
            seen.update(docs)
    for name, docs in splits.items():
        with open(os.path.join(out_dir, name + ".txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(d + "\n" for d in docs))
        print(f"{name}.txt: {len(docs)} lines, {used[name]} characters")


if __name__ == "__main__":
    main(sys.argv)
