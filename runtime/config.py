"""Typed configuration, declared once: flags, ``OSAD_*`` environment variables, validation and --help.

A command's settings are one dataclass deriving from :class:`Config`, each field declared with
:func:`setting` (its help text, check and, if the default naming does not fit, its flag). From
that one declaration come

* the command-line flag ``--field-name`` (``Config.add_arguments``), with ``--help`` text that
  names the environment variable and the default;
* the environment variable ``OSAD_FIELD_NAME``: a flag wins over the environment, the
  environment over the default (read once, when the parser is built);
* validation: a bad flag is an argparse error naming the flag, a bad environment variable or a
  bad value given in code a :class:`ConfigError` naming the field, its flag and its variable;
* the typed object the command runs with (``Config.from_args``).

Settings shared by several commands (the Kafka connection, say) are a Config of their own, held
by a field declared with :func:`section`; its settings become flags of the outer command.
No setting travels through ``os.environ`` inside a process: the typed object is passed along.

Example::

    >>> import argparse
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo(Config):
    ...     gap: int = setting(10, help="samples between windows", check=positive)
    ...     name: str = setting("x", help="a name")
    >>> p = argparse.ArgumentParser()
    >>> Demo.add_arguments(p, environ={"OSAD_NAME": "from-env"})
    >>> Demo.from_args(p.parse_args(["--gap", "5"]))
    Demo(gap=5, name='from-env')
    >>> Demo(gap=0)
    Traceback (most recent call last):
    ...
    osad.runtime.config.ConfigError: --gap (OSAD_GAP) = 0: must be greater than 0
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import typing
from dataclasses import MISSING, dataclass
from collections.abc import Mapping
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration value is wrong; the text names the flag, the variable and what to do."""


def env_name(flag: str) -> str:
    return "OSAD_" + flag.lstrip("-").replace("-", "_").upper()


@dataclass(frozen=True)
class Setting:
    """What one config field declares beyond its type and default."""

    help: str
    check: Callable[[Any], str | None] | None = None
    parse: Callable[[str], Any] | None = None  # text -> value (default: from the field's type)
    flag: str | None = None  # default: --<field-name>
    env: bool | str = True  # a name: that variable instead of OSAD_<FLAG>; False: none (positionals)
    choices: tuple | None = None
    group: str | None = None  # --help section
    metavar: str | None = None
    positional: bool = False
    nargs: str | None = None  # positionals: "?" for optional
    repeat: str | None = None  # a repeatable flag (a list); its variable separates values by this
    negate: bool = False  # a bool whose flag turns it off (--no-x sets the field to False)
    required: bool = False  # a flag that must be given (on the command line or by its variable)
    aliases: tuple[str, ...] = ()  # more flags for the same setting (e.g. a short "-o")

    def flag_for(self, name: str) -> str:
        return name if self.positional else (self.flag or "--" + name.replace("_", "-"))

    def env_for(self, name: str) -> str | None:
        if self.positional or not self.env:
            return None
        return self.env if isinstance(self.env, str) else env_name(self.flag_for(name))


def setting(default: Any = MISSING, *, default_factory: Any = MISSING, **kw) -> Any:
    """Declare a config field: ``gap: int = setting(10, help=..., check=positive)``."""
    meta = {"osad": Setting(**kw)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        val = default
        return dataclasses.field(default_factory=lambda: type(val)(val), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type, **overrides) -> Any:
    """A field holding a nested Config (e.g. the Kafka connection); its settings become flags of the
    outer command. ``overrides`` change that section's defaults for this command."""
    return dataclasses.field(default_factory=lambda: cls(**overrides),
                             metadata={"osad_section": cls, "osad_defaults": overrides})


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """``int | None`` -> int; ``list[int]`` -> list."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _base_type(args[0])
    return origin or tp


class Config:
    """Base of every typed configuration (a frozen dataclass whose fields use :func:`setting`)."""

    #: --help section title -> the text shown under it (a plain class attribute, not a field)
    group_descriptions: Mapping[str, str] = {}

    # -- introspection -----------------------------------------------------------------------
    @classmethod
    def settings(cls) -> list[tuple[dataclasses.Field, Setting]]:
        return [(f, f.metadata["osad"]) for f in dataclasses.fields(cls) if "osad" in f.metadata]

    @classmethod
    def sections(cls) -> list[tuple[dataclasses.Field, type]]:
        return [(f, f.metadata["osad_section"]) for f in dataclasses.fields(cls) if "osad_section" in f.metadata]

    # -- validation --------------------------------------------------------------------------
    def __post_init__(self):
        for f, s in self.settings():
            v = getattr(self, f.name)
            if s.check is None or v is None:
                continue
            for item in (v if s.repeat is not None else [v]):
                msg = s.check(item)
                if msg:
                    raise ConfigError(f"{self._where(f.name)} = {item!r}: {msg}")
        msg = self.validate()
        if msg:
            raise ConfigError(msg)

    def validate(self) -> str | None:
        """Checks across fields; return what is wrong (naming the flags) or None."""
        return None

    @classmethod
    def _where(cls, name: str) -> str:
        s = dict((f.name, st) for f, st in cls.settings())[name]
        env = s.env_for(name)
        return s.flag_for(name) + (f" ({env})" if env else "")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # -- argparse ----------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, *, environ: Mapping[str, str] | None = None,
                      defaults: Mapping[str, Any] | None = None, exclude: tuple[str, ...] = ()) -> None:
        """Add one flag per setting (sections included). ``defaults`` overrides field defaults for this
        command; ``exclude`` leaves settings out (they keep their defaults)."""
        env = os.environ if environ is None else environ
        hints = _hints(cls)
        defaults = dict(defaults or {})
        for f in dataclasses.fields(cls):
            if "osad_section" in f.metadata:
                sub = f.metadata["osad_section"]
                sub.add_arguments(parser, environ=env, defaults={**f.metadata["osad_defaults"],
                                                                 **defaults.get(f.name, {})},
                                  exclude=exclude)
                continue
            if "osad" not in f.metadata or f.name in exclude:
                continue
            s: Setting = f.metadata["osad"]
            target = _group(parser, s.group, cls.group_descriptions.get(s.group)) if s.group else parser
            default = defaults.get(f.name, f.default if f.default is not MISSING else
                                   (f.default_factory() if f.default_factory is not MISSING else None))
            action = _add(target, cls, f.name, s, hints[f.name], default, env)
            action.osad_setting = (cls, f.name)

    @classmethod
    def add_command(cls, subparsers, name: str, run: Callable[[argparse.Namespace], int], *,
                    exclude: tuple[str, ...] = (), **parser_kw) -> argparse.ArgumentParser:
        """A subcommand whose options are this config's settings and which calls ``run(args)``.

        Its help comes from the class docstring too: the first line is the one-line summary
        ``osad --help`` lists, the rest the command's description. ``parser_kw`` goes to ``add_parser``
        (epilog, formatter_class, or a description that must keep its own layout)."""
        summary, _, rest = inspect.cleandoc(cls.__doc__ or "").partition("\n")
        parser_kw.setdefault("help", summary.strip())
        parser_kw.setdefault("description", " ".join(rest.split()) or summary.strip())
        p = subparsers.add_parser(name, **parser_kw)
        environ = None
        if _CONFIG_FILE["path"] and name in _CONFIG_FILE["commands"]:
            environ = ConfigFile(_CONFIG_FILE["path"], cls, exclude).over(os.environ)
        cls.add_arguments(p, environ=environ, exclude=exclude)
        ConfigFileOption.add_arguments(p)  # read by osad/cli.py before the parsers are built
        p.set_defaults(func=run)
        return p

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides):
        """The typed config from parsed arguments (sections included); ``overrides`` win."""
        kw = {}
        for f in dataclasses.fields(cls):
            if "osad_section" in f.metadata:
                kw[f.name] = f.metadata["osad_section"].from_args(args)
            elif "osad" in f.metadata and hasattr(args, f.name):
                kw[f.name] = getattr(args, f.name)
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True)
class ConfigFileOption(Config):
    """Every command's --config (declared here once; osad/cli.py reads it before the parsers are built)."""

    config_file: str | None = setting(None, flag="--config", env="OSAD_CONFIG", metavar="FILE",
                                      help="YAML file of this command's settings, one key per option, named as the "
                                      "flag without its dashes (interval: 0.5; probe: [c:malloc, c:free]; "
                                      "follow-children: true); the OSAD_* variables and the flags win over it")


#: the config file the command being run was given (osad/cli.py finds it before the parsers are built)
_CONFIG_FILE: dict[str, Any] = {"path": None, "commands": ()}


def use_config_file(path: str | None, commands: tuple[str, ...]) -> None:
    """Read ``path`` (YAML) for the subcommand named by one of ``commands`` when its parser is built."""
    _CONFIG_FILE.update(path=path or None, commands=tuple(commands))


class ConfigFile:
    """A command's settings from a YAML file, as a layer beneath the environment: each key is an option's flag
    without its dashes (``interval``, ``max-processes`` or ``max_processes``, ``no-topics``), each value what the
    flag or the variable would take (a list for a repeatable option; true/false for a switch). It is checked
    like the variables (the same parsing, choices and checks), and a wrong key or value is a
    :class:`ConfigError` naming the file and the key. Precedence: flag, then variable, then file, then default.

    >>> import tempfile, os
    >>> @dataclass(frozen=True)
    ... class Demo(Config):
    ...     gap: int = setting(10, help="samples between windows", check=positive)
    >>> f = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False); _ = f.write("gap: 5"); f.close()
    >>> p = argparse.ArgumentParser(); Demo.add_arguments(p, environ=ConfigFile(f.name, Demo).over({}))
    >>> Demo.from_args(p.parse_args([]))
    Demo(gap=5)
    >>> os.unlink(f.name)
    """

    def __init__(self, path: str, cls: type, exclude: tuple[str, ...] = ()):
        self.path = path
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML: pip install pyyaml") from None
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot read it: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML: {' '.join(str(e).split())}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: give a mapping of option names to values (interval: 0.5), "
                              f"not a {type(data).__name__}")
        index = {}  # key -> (variable, setting)
        for owner, f, st in _all_settings(cls):
            if f.name in exclude:
                continue
            for flag in (st.flag_for(f.name), *st.aliases):
                if flag.startswith("--"):
                    index[flag[2:]] = (st.env_for(f.name), st)
        self.values: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        for key, value in data.items():
            k = str(key).lstrip("-").replace("_", "-")
            if k not in index:
                import difflib

                near = difflib.get_close_matches(k, index, n=3)
                hint = (f"; did you mean {', '.join(near)}?" if near
                        else f"; the options are: {', '.join(sorted(index))}")
                raise ConfigError(f"--config {path}: {key!r} is not an option of this command{hint}")
            var, st = index[k]
            if not var:
                raise ConfigError(f"--config {path}: {key!r} cannot be set in a file (give it on the command line)")
            if value is None:
                continue
            self.values[var] = self._text(key, value, st)
            self.keys[var] = str(key)

    def _text(self, key, value, st: Setting) -> str:
        if isinstance(value, bool):
            return "1" if value else "0"
        if isinstance(value, (list, tuple)):
            if st.repeat is None:
                raise ConfigError(f"--config {self.path}: {key!r} takes one value, not a list")
            return st.repeat.join(self._text(key, v, st) for v in value)
        if isinstance(value, dict):
            raise ConfigError(f"--config {self.path}: {key!r} takes a value, not a mapping")
        return str(value)

    def over(self, environ: Mapping[str, str]) -> "_Layered":
        """The environment with this file beneath it."""
        return _Layered(environ, self)

    def where(self, var: str) -> str:
        return f"--config {self.path}: {self.keys[var]}"


class _Layered(Mapping):
    """The environment, then a config file: what add_arguments reads; ``where`` names a value's origin."""

    def __init__(self, environ: Mapping[str, str], file: ConfigFile):
        self.environ, self.file = environ, file

    def __getitem__(self, k):
        if k in self.environ:
            return self.environ[k]
        return self.file.values[k]

    def __iter__(self):
        return iter({**self.file.values, **dict(self.environ)})

    def __len__(self):
        return len(set(self.file.values) | set(self.environ))

    def where(self, var: str) -> str:
        return f"environment variable {var}" if var in self.environ else self.file.where(var)


def _all_settings(cls):
    """(config class, field, setting) of every setting of ``cls``, sections included."""
    for f in dataclasses.fields(cls):
        if "osad_section" in f.metadata:
            yield from _all_settings(f.metadata["osad_section"])
        elif "osad" in f.metadata:
            yield cls, f, f.metadata["osad"]


def _parser_for(s: Setting, tp) -> Callable[[str], Any]:
    if s.parse is not None:
        return s.parse
    base = _base_type(tp)
    if base in (int, float, str):
        return base
    return str


def _add(target, cls, name: str, s: Setting, tp, default, env: Mapping[str, str]):
    flag = s.flag_for(name)
    var = s.env_for(name)
    base = _base_type(tp)
    conv = _parser_for(s, tp)
    raw = env.get(var) if var else None
    if base is bool and not s.positional:
        if raw not in (None, ""):
            on = raw.strip().lower() in ("1", "true", "yes", "on")
            if not on and raw.strip().lower() not in ("0", "false", "no", "off"):
                raise ConfigError(f"{_origin(env, var)}={raw!r}: give 1 or 0 (for {flag})")
            default = (not on) if s.negate else on
        shown = f" (env {var}=1)" if var else ""
        return target.add_argument(flag, *s.aliases, dest=name, action="store_false" if s.negate else "store_true",
                                   default=default, help=s.help + shown)
    if s.repeat is not None:
        vals = list(default or [])
        if raw not in (None, ""):
            vals = []
            for part in (x.strip() for x in raw.split(s.repeat)):
                if part:
                    vals.append(_convert_env(conv, s, part, var, flag, env))
        sep = "spaces" if s.repeat == " " else f"'{s.repeat}'"
        from_env = f"; env {var}, several separated by {sep}; flags replace the env" if var else ""
        return target.add_argument(flag, *s.aliases, dest=name, action=_FlagsReplaceEnv, type=_checked(conv, s.check),
                                   default=vals, metavar=s.metavar or name.upper(),
                                   help=f"{s.help} (repeatable{from_env})")
    if raw not in (None, ""):
        default = _convert_env(conv, s, raw, var, flag, env)
    shown = ""
    if var:
        shown = f" (env {var}; default: {default})" if default not in (None, "") else f" (env {var})"
    elif default not in (None, "") and not s.positional:
        shown = f" (default: {default})"
    kw: dict[str, Any] = dict(type=_checked(conv, s.check), help=(s.help + shown).replace("%", "%%"),
                              choices=list(s.choices) if s.choices else None)
    if s.metavar:
        kw["metavar"] = s.metavar
    if s.required and default in (None, ""):
        kw["required"] = True
    if s.positional:
        if s.nargs:
            kw["nargs"] = s.nargs
            kw["default"] = default
        return target.add_argument(name, **kw)
    return target.add_argument(flag, *s.aliases, dest=name, default=default, **kw)


def _group(parser: argparse.ArgumentParser, title: str, description: str | None):
    """The parser's --help section ``title``, made on first use (a command's sections share it)."""
    for g in getattr(parser, "_action_groups", ()):
        if g.title == title:
            return g
    return parser.add_argument_group(title, description)


def _convert_env(conv, s: Setting, raw: str, var: str, flag: str, env: Mapping[str, str] | None = None):
    where = _origin(env, var)
    try:
        v = conv(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}={raw!r} is not valid for {flag}: {e}") from None
    if s.choices is not None and v not in s.choices:
        raise ConfigError(f"{where}={raw!r}: choose one of {', '.join(map(str, s.choices))}")
    msg = s.check(v) if s.check else None
    if msg:
        raise ConfigError(f"{where}={raw!r} is not valid for {flag}: {msg}")
    return v


def _origin(env: Mapping[str, str] | None, var: str) -> str:
    """Where the value of ``var`` came from, for a message: the environment, or a config file's key."""
    where = getattr(env, "where", None)
    return where(var) if where else f"environment variable {var}"


def _checked(type_, check):
    def conv(s: str):
        try:
            v = type_(s)
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(f"{s!r} is not valid: {e}") from None
        if check:
            msg = check(v)
            if msg:
                raise argparse.ArgumentTypeError(msg)
        return v
    conv.__name__ = getattr(type_, "__name__", "value")
    return conv


class _FlagsReplaceEnv(argparse.Action):
    """Append, but the first flag replaces the values that came from the environment."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = getattr(namespace, "_flags_seen", set())
        cur = [] if self.dest not in seen else list(getattr(namespace, self.dest) or [])
        seen.add(self.dest)
        namespace._flags_seen = seen
        setattr(namespace, self.dest, cur + [values])


# -- checks and parsers --------------------------------------------------------------------------

def positive(v) -> str | None:
    return None if v > 0 else "must be greater than 0"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def at_least(n):
    def check(v):
        return None if v >= n else f"must be at least {n}"
    return check


def in_range(lo, hi, *, lo_open=True, hi_open=True):
    def check(v):
        ok = (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
        return None if ok else f"must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return check


def int_list(s: str) -> list[int]:
    vals = [int(x) for x in s.replace(" ", "").split(",") if x]
    if not vals:
        raise ValueError("give comma-separated integers, e.g. 10,30,60")
    return vals


# -- the settings every Kafka-connected command shares -------------------------------------------

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SECURITY = "Kafka security"


def _upper(s: str) -> str:
    return s.strip().upper()


def existing_file(v: str) -> str | None:
    """A path that must name a readable file ("" = not given)."""
    if not v:
        return None
    if not os.path.isfile(v):
        return "no such file" if not os.path.exists(v) else "not a file"
    if not os.access(v, os.R_OK):
        return "not readable by this user"
    return None


@dataclass(frozen=True)
class KafkaSecurity(Config):
    """How a client proves who it is to the brokers and checks who they are: TLS and SASL.

    Held by :class:`KafkaConfig` (so every Kafka-connected command has these flags) and by ``osad up``
    (which passes them on to its services). :func:`osad.runtime.kafka.client_options` turns it into the
    keyword arguments of every kafka-python client osad makes."""

    group_descriptions = {_SECURITY: "TLS and SASL for a secured Kafka cluster (docs/security.md); secrets can "
                          "come from files (--sasl-password-file, --ssl-key-password-file)"}

    security_protocol: str = setting("PLAINTEXT", parse=_upper, choices=SECURITY_PROTOCOLS, group=_SECURITY,
                                     help="how clients talk to the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT "
                                     "or SASL_SSL (SASL over TLS)")
    ssl_ca_file: str = setting("", check=existing_file, group=_SECURITY, metavar="PEM",
                               help="CA certificate(s) the brokers' certificates are checked against (default: "
                               "the system's trusted CAs)")
    ssl_cert_file: str = setting("", check=existing_file, group=_SECURITY, metavar="PEM",
                                 help="client certificate (chain) for mutual TLS; needs --ssl-key-file")
    ssl_key_file: str = setting("", check=existing_file, group=_SECURITY, metavar="PEM",
                                help="private key of --ssl-cert-file (may be in the same file)")
    ssl_key_password: str = setting("", group=_SECURITY, metavar="SECRET",
                                    help="password of an encrypted --ssl-key-file")
    ssl_key_password_file: str = setting("", check=existing_file, group=_SECURITY, metavar="PATH",
                                         help="read the --ssl-key-file password from this file (instead of "
                                         "--ssl-key-password)")
    ssl_check_hostname: bool = setting(True, flag="--no-ssl-check-hostname", negate=True, group=_SECURITY,
                                       help="accept a broker certificate that does not name the host connected to "
                                       "(it is still checked against the CA)")
    sasl_mechanism: str = setting("", parse=_upper, choices=SASL_MECHANISMS, group=_SECURITY,
                                  help="SASL mechanism for SASL_PLAINTEXT / SASL_SSL: PLAIN, SCRAM-SHA-256 or "
                                  "SCRAM-SHA-512")
    sasl_username: str = setting("", group=_SECURITY, help="SASL user name")
    sasl_password: str = setting("", group=_SECURITY, metavar="SECRET",
                                 help="SASL password (prefer --sasl-password-file: a flag shows in process "
                                 "listings)")
    sasl_password_file: str = setting("", check=existing_file, group=_SECURITY, metavar="PATH",
                                      help="read the SASL password from this file (first line), e.g. a mounted "
                                      "secret")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def validate(self) -> str | None:
        w = self._where
        if self.security_protocol not in SECURITY_PROTOCOLS:
            return f"{w('security_protocol')} = {self.security_protocol!r}: choose one of {', '.join(SECURITY_PROTOCOLS)}"
        if self.sasl_mechanism and self.sasl_mechanism not in SASL_MECHANISMS:
            return f"{w('sasl_mechanism')} = {self.sasl_mechanism!r}: choose one of {', '.join(SASL_MECHANISMS)}"
        proto = f"--security-protocol is {self.security_protocol}"
        tls_given = [n for n in ("ssl_ca_file", "ssl_cert_file", "ssl_key_file", "ssl_key_password",
                                 "ssl_key_password_file") if getattr(self, n)]
        if not self.ssl_check_hostname:
            tls_given.append("ssl_check_hostname")
        if tls_given and not self.uses_tls:
            return f"{w(tls_given[0])} is set but {proto}: TLS settings need SSL or SASL_SSL"
        sasl_given = [n for n in ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file")
                      if getattr(self, n)]
        if sasl_given and not self.uses_sasl:
            return f"{w(sasl_given[0])} is set but {proto}: SASL settings need SASL_PLAINTEXT or SASL_SSL"
        if self.ssl_cert_file and not self.ssl_key_file:
            return f"{w('ssl_cert_file')} needs {w('ssl_key_file')} too (its private key; it may be the same file)"
        if self.ssl_key_file and not self.ssl_cert_file:
            return f"{w('ssl_key_file')} needs {w('ssl_cert_file')} too (the client certificate)"
        if self.ssl_key_password and self.ssl_key_password_file:
            return f"give {w('ssl_key_password')} or {w('ssl_key_password_file')}, not both"
        if (self.ssl_key_password or self.ssl_key_password_file) and not self.ssl_key_file:
            name = "ssl_key_password" if self.ssl_key_password else "ssl_key_password_file"
            return f"{w(name)} is set but no {w('ssl_key_file')}: it is the password of that key"
        if self.uses_sasl:
            if not self.sasl_mechanism:
                return (f"{proto}: give {w('sasl_mechanism')} ({', '.join(SASL_MECHANISMS)}), "
                        f"{w('sasl_username')} and a password")
            if not self.sasl_username:
                return f"{w('sasl_mechanism')} {self.sasl_mechanism} needs {w('sasl_username')}"
            if self.sasl_password and self.sasl_password_file:
                return f"give {w('sasl_password')} or {w('sasl_password_file')}, not both"
            if not (self.sasl_password or self.sasl_password_file):
                return (f"{w('sasl_mechanism')} {self.sasl_mechanism} needs a password: "
                        f"{w('sasl_password_file')} or {w('sasl_password')}")
        return None

    _SECRETS = ("ssl_key_password", "sasl_password")

    def __repr__(self) -> str:  # never a password in a log line or a traceback
        shown = ", ".join(f"{f.name}={'***' if f.name in self._SECRETS and getattr(self, f.name) else repr(getattr(self, f.name))}"
                          for f, _ in self.settings())
        return f"KafkaSecurity({shown})"

    def to_args(self) -> list[str]:
        """The flags that give another osad command these settings (defaults left out), e.g. the services
        ``osad up`` starts. A password given as a value is not among them (a command line shows in process
        listings): :meth:`secret_env` has it, for the child's environment; a password file is passed on."""
        out: list[str] = []
        for f, s in self.settings():
            v = getattr(self, f.name)
            if v == f.default or f.name in self._SECRETS:
                continue
            flag = s.flag_for(f.name)
            out += [flag] if isinstance(v, bool) else [flag, str(v)]  # a bool differs only when its flag was given
        return out

    def secret_env(self) -> dict[str, str]:
        """The passwords given as values, as the environment variables that set them in a child command."""
        env = {}
        for f, s in self.settings():
            if f.name in self._SECRETS and getattr(self, f.name):
                env[s.env_for(f.name)] = getattr(self, f.name)
        return env


def read_secret(path: str) -> str:
    """The first line of a secret file (a trailing newline is not part of the secret)."""
    with open(path, encoding="utf-8") as fh:
        return fh.readline().rstrip("\r\n")


@dataclass(frozen=True)
class KafkaConfig(Config):
    """Where the broker is, how osad's topics are named there and how clients secure the connection."""

    bootstrap: str = setting("127.0.0.1:9092", help="Kafka bootstrap servers, comma-separated host:port")
    topic_prefix: str = setting("", help="prefix for every topic name and consumer group (several "
                                "installations on one cluster)")
    security: KafkaSecurity = section(KafkaSecurity)


@dataclass(frozen=True)
class ServiceConfig(Config):
    """What every long-running service has besides the broker: its group, metrics port and log level."""

    group: str = setting("", help="consumer group; replicas in one group share partitions "
                         "(default: osad-<service>)")
    metrics_port: int = setting(0, help="serve Prometheus /metrics and /healthz on this port (0: off)",
                                check=non_negative)
    metrics_port_span: int = setting(1, check=positive, metavar="N",
                                     help="when the metrics port is taken, try the next N-1 ports too (replicas "
                                     "sharing one host network)")
    metrics_port_file: str = setting("", metavar="PATH", help="write the metrics port actually served to PATH "
                                     "(the images' healthcheck reads it)")
    log_level: str = setting("INFO", help="log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def setup_logging(level: str = "INFO") -> None:
    import logging

    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

