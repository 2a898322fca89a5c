"""Write docs/api.md, the API reference, from the docstrings of dkm_param's public names.

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 if docs/api.md is out of date
"""

import inspect
import sys
from pathlib import Path

import dkm_param

TARGET = Path(__file__).with_name("api.md")


def entry(name: str, obj) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function"
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = "(...)"
    lines = [f"### `{name}{signature}`", "", f"*{kind}*", "", inspect.cleandoc(obj.__doc__ or "(no docstring)"), ""]
    if inspect.isclass(obj):
        members = {}
        for cls in reversed(obj.__mro__):  # dkm_param's own bases too, the class's own members last
            if cls.__module__.startswith("dkm_param"):
                members.update(vars(cls))
        for member, value in sorted(members.items()):
            if member.startswith("_") or not (
                inspect.isfunction(value) or isinstance(value, (property, classmethod, staticmethod))
            ):
                continue
            func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
            doc = inspect.getdoc(func.fget if isinstance(func, property) else func)
            if doc:
                lines += [f"- `{name}.{member}`: {doc.splitlines()[0]}"]
        lines.append("")
    return lines


def render() -> str:
    out = [
        "# dkm_param API reference",
        "",
        "Generated from the docstrings by `python docs/make_api.py`; every name in `dkm_param.__all__`.",
        "",
    ]
    for name in sorted(dkm_param.__all__, key=str.lower):
        out += entry(name, getattr(dkm_param, name))
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if TARGET.exists() and TARGET.read_text() == text else 1)
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
