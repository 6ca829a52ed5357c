"""
flags.py: a flat config dataclass as command-line flags. Each field made by `field` carries its
help, its valid values and what it needs, so that one line is at once the flag, its range check,
its help text, the refusal of a value out of range and the record in config.json.

  field        a dataclass field with help, check (a util.number range), choices, needs = (when, why), resumable
  fields       dataclasses.fields, each checked to be a `field`
  typed_by     which fields the user gave: typed on the command line, or (in Python) not at their default
  check        each field's own check on a config made in Python or read from a file (ValueError)
  refuse_idle  a flag the user typed that cannot act on this config (another method's; `needs` not met)
  add_flags    one flag per field, checked as it is parsed
  typed        which fields the command line gave, at their default value or not
"""
import argparse
import dataclasses


def field(default, help, check=None, choices=None, needs=None, resumable=False):
    """A config field: its default, its help, its valid values (check: a util.number range; choices),
    needs = (when, why): the condition on the rest of the config without which it cannot act (a flag
    the run would silently ignore is refused), and resumable: --resume may change it (how a run
    runs, not what it computes)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "choices": choices,
                                                        "needs": needs, "resumable": resumable})


def fields(cls):
    """dataclasses.fields(cls), each made by `field`: a plain one (a researcher's new `x: float = 0.0`)
    has no help, check or flag, and is said in one line naming it, not as a KeyError."""
    fs = dataclasses.fields(cls)
    for f in fs:
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: a plain dataclass field; declare it with flags.field(default, "
                            f"help) (rigsa.py's _f), which gives it its flag, help, check and record in config.json")
    return fs


def resumable(cls):
    """The fields of `cls` that --resume may change."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}


def typed_by(cfg, given):
    """f -> whether the user gave flag f: in `given` (the command line's typed flags), or else (a
    config made in Python) set to another value than its default."""
    defaults = type(cfg)()
    return (lambda f: f in given) if given is not None else (lambda f: getattr(cfg, f) != getattr(defaults, f))


def flag(name):
    return "--" + name.replace("_", "-")


def check(cfg):
    """Each field's own check (its type, choices and range), as its flag's parser would. ValueError."""
    for f in fields(type(cfg)):
        v = getattr(cfg, f.name)
        if f.metadata["choices"] and v not in f.metadata["choices"]:
            raise ValueError(f"{flag(f.name)} {v!r}: not one of {', '.join(f.metadata['choices'])}")
        kind = type(f.default)
        if kind in (bool, str) and not isinstance(v, kind) or kind in (int, float) and isinstance(v, (bool, str)):
            raise ValueError(f"{flag(f.name)} {v!r}: not {'an' if kind is int else 'a'} {kind.__name__}")
        if f.metadata["check"]:
            try:
                f.metadata["check"](str(v))
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{flag(f.name)}: {e}") from None


def refuse_idle(cfg, typed, users, method, method_flag):
    """A flag the user typed (typed(name)) that cannot act is refused: one that users(name), the
    methods using it ([] = every one), says `method` does not use, or whose `needs` do not hold."""
    for f in fields(type(cfg)):
        if not typed(f.name):
            continue
        v = getattr(cfg, f.name)
        as_typed = f"{flag(f.name)} {v}" if not isinstance(v, bool) else flag(f.name) if v else "--no-" + flag(f.name)[2:]
        if users(f.name) and method not in users(f.name):
            raise ValueError(f"{as_typed}: {method_flag} {method} does not use it (only {', '.join(users(f.name))} do); "
                             f"drop it")
        if f.metadata["needs"] and not f.metadata["needs"][0](cfg):
            raise ValueError(f"{as_typed}: acts only with {f.metadata['needs'][1]}; drop it")


def add_flags(ap, cls):
    """One flag per field of dataclass `cls`, checked as it is parsed (its range or choices)."""
    for f in fields(cls):
        check = f.metadata["check"]
        h = f"{f.metadata['help']} [default: {f.default}" + (f"; {check.want}]" if check else "]")
        if f.type in (bool, "bool"):
            ap.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=f.default, help=h)
        else:
            ap.add_argument(flag(f.name), type=check or type(f.default), choices=f.metadata["choices"],
                            default=f.default, help=h)
    return ap


def typed(parser, argv, cls):
    """The fields of `cls` whose flags argv gives, at their default value or not (argparse fills in a
    default only where the namespace has no value yet, so a sentinel marks the ones not typed)."""
    unset = object()
    ns = parser.parse_args(argv, argparse.Namespace(**{f.name: unset for f in dataclasses.fields(cls)}))
    return {f.name for f in dataclasses.fields(cls) if getattr(ns, f.name) is not unset}
