"""Prompt templates: YAML files of Jinja (prompt, completion) pairs, rendered in a sandbox.

A template file is either grouped by source name,

    amazon_reviews:                     # applies to the source named amazon_reviews
      rating_from_review:
        prompt: "Predict the associated rating from the following review:\\n{{ text }}\\nRating (1-5):"
        completion: " {{ rating }}"
        answer_choices: [" 1", " 2", " 3", " 4", " 5"]   # optional: rank classification
        metrics: [exact_match, rank_accuracy, mae, confusion]   # optional; see METRICS
        stop: ["\\n"]                                    # optional: generation ends at these strings
    "*":                                # applies to every source
      ...

or flat, {template_name: {prompt, completion, ...}}, which is the same as putting everything under "*".
Rendering {"text": "Great sound.", "rating": 5} with rating_from_review gives
("Predict the associated rating from the following review:\\nGreat sound.\\nRating (1-5):", " 5").

Templates are user input, so Jinja runs in `ImmutableSandboxedEnvironment` (no attribute access to
dunders, no mutation of records) with `StrictUndefined` (a misspelt field is an error, not an empty string).
"""

import dataclasses
import functools
import importlib.resources
import pathlib
from collections.abc import Mapping
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox
import yaml

from ift_jax.errors import UserError

ALL_SOURCES = "*"
BUILTIN_DEFAULT = "catalog"
_SPEC_KEYS = ("prompt", "completion", "answer_choices", "metrics", "stop")

# Task metrics a template may ask for (ift_jax.task_eval computes them on generated or ranked answers).
METRICS = {
    "exact_match": "generated completion equals the reference after normalization (case, spaces, punctuation)",
    "rank_accuracy": "the answer choice with the highest log-likelihood is the reference (needs answer_choices)",
    "rouge": "ROUGE-1/2/L F1 of the generated completion against the reference (rouge-score package)",
    "mae": "mean absolute error of the ranked choice read as a number (needs numeric answer_choices)",
    "confusion": "confusion matrix of reference against ranked choice (needs answer_choices)",
}
_NEEDS_CHOICES = ("rank_accuracy", "mae", "confusion")
DEFAULT_STOP = ("\n",)

_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)


@functools.lru_cache(maxsize=1024)
def _compile(source: str) -> jinja2.Template:
  """Compiles once per distinct source text; templates are rendered for every record."""
  return _ENV.from_string(source)


@functools.lru_cache(maxsize=1024)
def _variables(source: str) -> frozenset[str]:
  """Top-level names a template reads, minus Jinja's globals (range, dict, ...)."""
  return frozenset(jinja2.meta.find_undeclared_variables(_ENV.parse(source)) - set(_ENV.globals))


def _check_syntax(source: str, *, origin: str, label: str, first_line: int = 1) -> None:
  """Raises UserError "FILE:LINE: <label>: Jinja syntax error: ..." on a syntax error.

  `first_line` is the file line of the template's first line, so LINE points into the file.
  """
  try:
    _compile(source)
  except jinja2.TemplateSyntaxError as e:
    line = first_line + (e.lineno or 1) - 1
    raise UserError(f"{origin}:{line}: {label}: Jinja syntax error: {e.message}; fix the template") from e


@dataclasses.dataclass(frozen=True)
class Template:
  """One (prompt, completion) template.

  Attributes:
    name: template name (unique within its source).
    prompt: Jinja source of the prompt; every record field is a variable.
    completion: Jinja source of the completion the model learns to produce.
    answer_choices: the possible completions for rank classification, or None for free generation.
    metrics: names of the task metrics to report (keys of METRICS); () = exact_match, plus rank_accuracy
      when the template has answer_choices.
    stop: generation stops at the first of these strings (the completion never contains them).
    origin: the file the template came from (for error messages).
  """
  name: str
  prompt: str
  completion: str
  answer_choices: tuple[str, ...] | None = None
  metrics: tuple[str, ...] = ()
  stop: tuple[str, ...] = DEFAULT_STOP
  origin: str = "<string>"

  def __post_init__(self):
    for field in ("prompt", "completion"):
      _check_syntax(getattr(self, field), origin=self.origin, label=f"template {self.name!r} {field}")

  @property
  def task_metrics(self) -> tuple[str, ...]:
    """The metrics to compute: the declared ones, or the defaults."""
    if self.metrics:
      return self.metrics
    return ("exact_match", "rank_accuracy") if self.answer_choices else ("exact_match",)

  @property
  def prompt_fields(self) -> frozenset[str]:
    """Record fields the prompt reads: the candidates for truncation."""
    return _variables(self.prompt)

  @property
  def fields(self) -> frozenset[str]:
    """Record fields the prompt or the completion reads."""
    return _variables(self.prompt) | _variables(self.completion)

  def render(self, record: Mapping[str, Any], *,
             overrides: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """Renders (prompt, completion) from a record; `overrides` replace field values (e.g. cut text).

    Example: prompt "Review: {{ text }}\\nSentiment:", completion " {{ sentiment }}" and
    {"text": "Fun.", "sentiment": "positive"} give ("Review: Fun.\\nSentiment:", " positive").

    Raises:
      UserError: a field is missing, the sandbox blocked an unsafe expression, or rendering failed.
    """
    context = {**record, **(overrides or {})}
    missing = sorted(self.fields - context.keys())
    if missing:
      raise UserError(f"template {self.name!r} ({self.origin}) uses field {missing[0]!r} but the record has "
                      f"fields {sorted(record)}; fix the template or the data")
    return self._render(self.prompt, context), self._render(self.completion, context)

  def render_prompt(self, record: Mapping[str, Any]) -> str:
    """The prompt alone, for a record that has no answer yet (generation)."""
    missing = sorted(self.prompt_fields - record.keys())
    if missing:
      raise UserError(f"template {self.name!r} ({self.origin}) prompt uses field {missing[0]!r} but the record has "
                      f"fields {sorted(record)}; add the field to the record")
    return self._render(self.prompt, dict(record))

  def _render(self, source: str, context: dict[str, Any]) -> str:
    try:
      return _compile(source).render(context)
    except jinja2.sandbox.SecurityError as e:
      raise UserError(f"template {self.name!r} ({self.origin}): blocked by the sandbox ({e}); "
                      "remove the unsafe expression") from e
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as e:
      raise UserError(f"template {self.name!r} ({self.origin}): rendering failed ({type(e).__name__}: {e}) "
                      f"for a record with fields {sorted(context)}; fix the template or the data") from e


def load_templates(path_or_builtin: str) -> dict[str, dict[str, Template]]:
  """Loads a template YAML file: {source name or "*": {template name: Template}}.

  Args:
    path_or_builtin: a YAML file path, or "" (= "catalog") / the stem of a file in
      ift_jax/data/templates/ for the built-in templates.

  Raises:
    UserError: missing file, YAML or Jinja syntax error, or a malformed template entry; the message names
      the file, line and template.
  """
  path, text = _read_template_file(path_or_builtin)
  origin = str(path)
  data, nodes = _parse_yaml(text, origin=origin)
  if not isinstance(data, dict) or not data:
    raise UserError(f"{origin}: expected a mapping of templates (source -> name -> prompt/completion); "
                    "fix the file")
  groups: dict[str, dict[str, Template]] = {}
  for key, value in data.items():
    where = f"{origin}:{_line(nodes, (key,))}"
    if not isinstance(value, dict):
      raise UserError(f"{where}: {key!r} must be a template (prompt, completion) or a group of templates; "
                      "fix the file")
    if _is_spec(value):  # flat file: a template that applies to every source
      entries = [(ALL_SOURCES, str(key), value, (key,))]
    else:
      entries = [(str(key), str(name), spec, (key, name)) for name, spec in value.items()]
    for source, name, spec, key_path in entries:
      if name in groups.get(source, {}):
        raise UserError(f"{origin}:{_line(nodes, key_path)}: template {source}/{name} is defined twice; "
                        "rename one")
      groups.setdefault(source, {})[name] = _build(spec, name=name, source=source, origin=origin,
                                                   nodes=nodes, key_path=key_path)
  return groups


def templates_for(templates: Mapping[str, Mapping[str, Template]], source: str) -> dict[str, Template]:
  """The templates that apply to `source`: the "*" group, overridden by the source's own group by name.

  Raises:
    UserError: no template applies to the source.
  """
  chosen = {**templates.get(ALL_SOURCES, {}), **templates.get(source, {})}
  if not chosen:
    origins = sorted({t.origin for group in templates.values() for t in group.values()})
    raise UserError(f"no templates for data source {source!r} in {', '.join(origins) or 'the template file'} "
                    f"(it has groups {sorted(templates)}); add a group {source!r} or '*'")
  return chosen


def find_template(spec: str) -> Template:
  """One template by "source/name" (built-in catalog) or "FILE.yaml:source/name" ("*/name" for flat files)."""
  path, _, key = spec.rpartition(":") if ":" in spec else ("", "", spec)
  source, _, name = key.rpartition("/")
  loaded = load_templates(path)
  group = templates_for(loaded, source or ALL_SOURCES) if (source or ALL_SOURCES) in loaded else {}
  if name not in group:
    names = sorted(f"{s}/{n}" for s, g in loaded.items() for n in g)
    raise UserError(f"--template={spec!r}: no such template; use one of {', '.join(names)} "
                    "(prefix FILE.yaml: for your own file)")
  return group[name]


def builtin_names() -> list[str]:
  """Stems of the built-in template files (ift_jax/data/templates/*.yaml)."""
  folder = importlib.resources.files("ift_jax.data").joinpath("templates")
  return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_template_file(path_or_builtin: str) -> tuple[pathlib.Path | str, str]:
  name = path_or_builtin or BUILTIN_DEFAULT
  if name in builtin_names():
    resource = importlib.resources.files("ift_jax.data").joinpath("templates", f"{name}.yaml")
    return f"ift_jax/data/templates/{name}.yaml", resource.read_text(encoding="utf-8")
  path = pathlib.Path(name).expanduser()
  if not path.is_file():
    raise UserError(f"template file {name!r} not found; give a YAML path or a built-in name "
                    f"({', '.join(builtin_names())})")
  try:
    return path, path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not UTF-8 text; re-save it as UTF-8") from e


def _parse_yaml(text: str, *, origin: str) -> tuple[Any, dict[tuple, yaml.Node]]:
  """Returns (data, {key path: value node}); the nodes give line numbers for error messages."""
  try:
    data = yaml.safe_load(text)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    raise UserError(f"{origin}{line}: YAML syntax error: {problem}; fix the file") from e
  nodes: dict[tuple, yaml.Node] = {}
  _index_nodes(root, (), nodes, origin=origin)
  return data, nodes


def _index_nodes(node: yaml.Node | None, path: tuple, out: dict[tuple, yaml.Node], *, origin: str) -> None:
  """Records the value node of every mapping key path; rejects duplicate keys (YAML keeps the last)."""
  if not isinstance(node, yaml.MappingNode):
    return
  for key_node, value_node in node.value:
    key_path = path + (key_node.value,)
    if key_path in out:
      raise UserError(f"{origin}:{key_node.start_mark.line + 1}: duplicate key {key_node.value!r}; "
                      "remove one")
    out[key_path] = value_node
    _index_nodes(value_node, key_path, out, origin=origin)


def _line(nodes: Mapping[tuple, yaml.Node], key_path: tuple) -> int:
  node = nodes.get(tuple(str(k) for k in key_path))
  return node.start_mark.line + 1 if node is not None else 1


def _first_content_line(nodes: Mapping[tuple, yaml.Node], key_path: tuple) -> int:
  """File line of a scalar's first content line: block scalars (| or >) start below their indicator."""
  node = nodes.get(tuple(str(k) for k in key_path))
  if node is None:
    return 1
  return node.start_mark.line + (2 if getattr(node, "style", None) in ("|", ">") else 1)


def _is_spec(value: Mapping[str, Any]) -> bool:
  return "prompt" in value or "completion" in value


def _build(spec: Any, *, name: str, source: str, origin: str, nodes: Mapping[tuple, yaml.Node],
           key_path: tuple) -> Template:
  """Validates one template entry and checks its Jinja syntax with file line numbers."""
  where = f"{origin}:{_line(nodes, key_path)}: template {source}/{name}"
  if not isinstance(spec, dict):
    raise UserError(f"{where}: expected a mapping with prompt and completion; fix the file")
  unknown = sorted(set(spec) - set(_SPEC_KEYS))
  if unknown:
    raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(_SPEC_KEYS)}")
  for field in ("prompt", "completion"):
    if not isinstance(spec.get(field), str):
      raise UserError(f"{where}: {field!r} must be a string; add it")
    _check_syntax(spec[field], origin=origin, label=f"template {source}/{name} {field}",
                  first_line=_first_content_line(nodes, key_path + (field,)))
  choices = _strings(spec, "answer_choices", where=where, optional=True)
  metrics = _strings(spec, "metrics", where=where, optional=False) or ()
  for metric in metrics:
    if metric not in METRICS:
      raise UserError(f"{where}: unknown metric {metric!r}; use any of {', '.join(METRICS)}")
    if metric in _NEEDS_CHOICES and not choices:
      raise UserError(f"{where}: metric {metric!r} needs answer_choices; add them or drop the metric")
  if "mae" in metrics and not all(_is_number(c) for c in choices):
    raise UserError(f"{where}: metric 'mae' needs numeric answer_choices, got {list(choices)}; drop 'mae'")
  stop = _strings(spec, "stop", where=where, optional=True, allow_empty=True)
  return Template(name=name, prompt=spec["prompt"], completion=spec["completion"], answer_choices=choices,
                  metrics=metrics, stop=DEFAULT_STOP if stop is None else stop, origin=origin)


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def _strings(spec: Mapping[str, Any], key: str, *, where: str, optional: bool,
             allow_empty: bool = False) -> tuple[str, ...] | None:
  value = spec.get(key)
  if value is None:
    return None if optional else ()
  ok = isinstance(value, list) and (value or allow_empty) and all(isinstance(v, str) and v for v in value)
  if not ok:
    raise UserError(f"{where}: {key!r} must be a {'' if allow_empty else 'non-empty '}list of non-empty "
                    "strings; fix it")
  return tuple(value)
