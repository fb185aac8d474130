#!/usr/bin/env python3
"""Pull the code blocks out of README.md and the headers' opening comments into C++ sources.

Issue 12.4: the README's ```cpp blocks and the `// Example:` block of every public header are
compiled by the test suite, verbatim. This script is the build-time extraction step; CMake runs
it (tests/snippets/CMakeLists.txt) whenever README.md, a header or a prelude changes.

  extract_snippets.py readme  README.md  PRELUDE  OUT.cpp
  extract_snippets.py header  HEADER.hpp INCLUDE_NAME PRELUDE|- OUT.cpp

What a snippet becomes:
  - its `#include` lines move to the top of the generated file;
  - a snippet with a line starting (at column 0) with `template`, `namespace` or `int main`, or
    with a function definition (`bool name(params) {` at column 0), is placed at namespace scope
    as is (explicit specialisations such as std::hash<key> and function definitions must be);
  - every other snippet becomes the body of its own function `void snippet_<line>()`, so it may
    declare local variables, local structs and lambdas and call anything the prelude declares;
  - a `#line` directive precedes each snippet, so a compiler error names README.md or the header
    and the line the reader sees.
Names a snippet uses without declaring them (job, entity, reconcile(), ...) come from the prelude:
declarations only, since the generated code is compiled, never linked or run.

Header example format: a line `// Example:` (or `// Example (what):`, `// Examples:`) in the
header's opening comment, followed by lines `//   code` (the comment marker and three spaces,
which are stripped); the first line that does not start with `//   ` ends the block.
"""
import re
import sys
from pathlib import Path

NAMESPACE_SCOPE = re.compile(r"^(template\b|namespace\b|int\s+main\b)")
# A function definition starting at column 0: `type name(params) [const] [noexcept] {`, where the
# parameters hold no lambda (a declaration `std::jthread t([&] {` is a statement, not a function).
FUNCTION_DEFINITION = re.compile(
    r"^(?!(?:if|for|while|switch|return|else|do|case|using|auto)\b)"
    r"[A-Za-z_][\w:<>,*& ]*[ *&]([A-Za-z_]\w*)\s*\(([^()\[\]=]|\([^()]*\))*\)\s*"
    r"(?:const\s*)?(?:noexcept\s*)?\{\s*$")
INCLUDE = re.compile(r"^\s*#\s*include\b")
EXAMPLE_HEAD = re.compile(r"^//\s*Examples?\b[^:]*:\s*$")
EXAMPLE_LINE = re.compile(r"^//   (.*)$")
FENCE_OPEN = re.compile(r"^(\s*)```\s*(c\+\+|cpp)\s*$")
FENCE_CLOSE = re.compile(r"^\s*```\s*$")


def readme_snippets(path):
    """Yields (first_line_number, [lines]) for every ```cpp / ```c++ block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent = len(m.group(1))
        start = i + 1
        j = start
        while j < len(lines) and not FENCE_CLOSE.match(lines[j]):
            j += 1
        if j == len(lines):
            sys.exit(f"{path}:{i + 1}: unterminated ```cpp block")
        yield start + 1, [line[indent:] if line[:indent].isspace() else line for line in lines[start:j]]
        i = j + 1


def header_snippets(path):
    """Yields (first_line_number, [lines]) for every Example block in the opening comment."""
    lines = path.read_text(encoding="utf-8").splitlines()
    opening = []
    for line in lines:
        if not line.startswith("//"):
            break
        opening.append(line)
    i = 0
    while i < len(opening):
        if not EXAMPLE_HEAD.match(opening[i]):
            i += 1
            continue
        start = i + 1
        j = start
        code = []
        while j < len(opening) and EXAMPLE_LINE.match(opening[j]):
            code.append(EXAMPLE_LINE.match(opening[j]).group(1))
            j += 1
        if not code:
            sys.exit(f"{path}:{i + 1}: 'Example:' is not followed by lines starting with '//   '")
        yield start + 1, code
        i = j


def render(source_path, snippets, head):
    """The generated translation unit: includes, the head (prelude), then each snippet."""
    source = Path(source_path).resolve().as_posix()
    includes, bodies = [], []
    count = 0
    for first_line, code in snippets:
        count += 1
        kept = []
        for offset, line in enumerate(code):
            if INCLUDE.match(line):
                includes.append(f'#line {first_line + offset} "{source}"\n{line.strip()}')
                kept.append("")  # keep line numbers aligned
            else:
                kept.append(line)
        text = "\n".join(kept)
        directive = f'#line {first_line} "{source}"'
        if any(NAMESPACE_SCOPE.match(line) or FUNCTION_DEFINITION.match(line) for line in kept):
            bodies.append(f"// snippet at {source}:{first_line} (namespace scope)\n{directive}\n{text}\n")
        else:
            bodies.append(
                f"// snippet at {source}:{first_line}\n"
                f"void snippet_{first_line}();\n"
                f"void snippet_{first_line}() {{\n{directive}\n{text}\n}}\n")
    out = [f"// Generated by tests/snippets/extract_snippets.py from {source}; do not edit.",
           f"// {count} snippet(s)."]
    out += head
    out += includes
    out += bodies
    return "\n".join(out) + "\n", count


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def prelude_lines(prelude):
    if prelude == "-":
        return []
    return [f'#include "{Path(prelude).resolve().as_posix()}"']


def main(argv):
    if len(argv) == 5 and argv[1] == "readme":
        _, _, readme, prelude, out = argv
        head = ["#include <sluice/sluice.hpp>", "#include <sluice/testing/manual_clock.hpp>"]
        text, count = render(readme, readme_snippets(Path(readme)), head + prelude_lines(prelude))
        if count == 0:
            sys.exit(f"{readme}: no ```cpp block found")
    elif len(argv) == 6 and argv[1] == "header":
        _, _, header, include_name, prelude, out = argv
        head = [f"#include <{include_name}>"] + prelude_lines(prelude)
        text, count = render(header, header_snippets(Path(header)), head)
        if count == 0:
            text += f"// {include_name} has no Example block in its opening comment.\n"
    else:
        sys.exit(__doc__)
    write(out, text)


if __name__ == "__main__":
    main(sys.argv)
