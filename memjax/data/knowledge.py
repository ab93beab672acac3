"""The embedded knowledge corpus: biographies of fictional people, and probes of their facts.

Memory layers are meant to store facts; this corpus measures that without downloading anything.
`make_people(n, seed)` draws n people with unique names and six attributes each (birth date, birth
city, university, major, employer, employer city) from fixed lists with a seeded numpy generator.
`biography` renders a person as one document: one sentence per attribute, in a shuffled order,
each attribute in one of several phrasings.

Probes ask for each fact as a completion in the biography's own words (a model trained from
scratch on biographies never sees questions, so a "Q: ... A:" form would test the format, not the
facts): the prompt is the sentence up to the value, the answer is the value with its leading
space, without the final period, e.g.

    prompt "Ada Varnell was born in"    answer " Lisbon"

A probe is recalled when greedy decoding of the prompt (after BOS) reproduces the answer's ids
exactly, with the ids of `probe_ids`: those of prompt + answer, split after the prompt's (encoding
" Lisbon" alone gives an extra "▁" piece under SentencePiece models that keep spaces, such as
Llama 2's, though the biography never holds it). Each person states each attribute in one
phrasing, fixed by a hash of the name and the attribute, so the probe asks in the words the
biography used. `chance_level(attribute)` is
1 / the number of values the attribute can take: the accuracy of a uniform guess.

`build_knowledge_dataset` writes the corpus as the TFDS dataset `memjax_knowledge/n{N}_seed{S}`
(ArrayRecord), for `tfds.data_source` and the rest of the pipeline:

- split `train`: one example per person, `text` = the biography (and `name`);
- split `probe`: one example per person and attribute: `prompt`, `answer`, `attribute`, `name`.

TFDS has one feature set per dataset, so each split leaves the other's fields empty. Example i of
`train` is person i, and `probe` holds person i's six probes at 6i..6i+5, in ATTRIBUTES order.
TFDS 4.9.10 prepares a `GeneratorBasedBuilder` in the `array_record` format without TensorFlow (its
example serialiser and writer are pure Python); it writes into an `incomplete.*` directory and
renames it when done, so a half-built dataset is never read.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import tempfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from memjax import paths
from memjax.data.tokenizers import Tokenizer

ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "employer_city")

FIRST_NAMES = (
    "Ada", "Alaric", "Amara", "Anselm", "Aria", "Bastian", "Beatrix", "Bram", "Calla", "Casimir",
    "Cecily", "Cyrus", "Dalia", "Dorian", "Edda", "Elio", "Elowen", "Emeric", "Esme", "Ezra",
    "Fenna", "Florian", "Freya", "Gideon", "Greta", "Hale", "Halina", "Ignatius", "Ilse", "Imre",
    "Isolde", "Jarek", "Juno", "Kasimir", "Keira", "Lazlo", "Leona", "Linnea", "Lucian", "Maren",
    "Marius", "Mila", "Nadia", "Nico", "Noor", "Oriel", "Orla", "Otto", "Perpetua", "Pim",
    "Quincy", "Ragna", "Remy", "Rosalind", "Rune", "Sabine", "Silas", "Solveig", "Soren", "Tamsin",
    "Thaddeus", "Thea", "Tobias", "Ulla", "Vesna", "Viggo", "Wilma", "Wren", "Xavier", "Yara",
    "Yusuf", "Zelda", "Zoltan", "Odile", "Milo", "Inez", "Henrik", "Greer", "Fabian", "Delphine",
)

LAST_NAMES = (
    "Abernoth", "Alderwick", "Ashgrove", "Barrowden", "Belcastro", "Blackthorn", "Brennick",
    "Calloway", "Carrowmore", "Castellane", "Corvane", "Dallimore", "Delacroix", "Drassow",
    "Dunmarrow", "Elsworth", "Falkenrath", "Farrowgate", "Fenwick", "Galloway", "Garrowby",
    "Greystoke", "Halloran", "Harrowgate", "Hawkmere", "Ingleby", "Ivanova", "Jessop", "Kestrel",
    "Kilbride", "Korvath", "Larkspur", "Lindqvist", "Lowther", "Marchetti", "Merrivale", "Mirelli",
    "Montague", "Nettlefold", "Norwood", "Oakhurst", "Oltmann", "Orsini", "Pemberton", "Pendrake",
    "Quartermaine", "Quillan", "Ravenscroft", "Redmayne", "Rookwood", "Rosenthal", "Saltmarsh",
    "Scarrow", "Sinclair", "Stormholt", "Tallis", "Thornbury", "Trevelyan", "Underhill",
    "Valcourt", "Vantrell", "Varnell", "Vessey", "Wakefield", "Westergaard", "Whitlock",
    "Winterbourne", "Wrexham", "Yardley", "Ystrad", "Zanetti", "Zellweger", "Brightwell",
    "Copperfield", "Duskmoor", "Emberly", "Foxworth", "Gildersleeve", "Holloway", "Juniper",
)

CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Montreal", "Kyoto", "Valparaiso", "Tbilisi", "Reykjavik",
    "Marrakesh", "Krakow", "Hanoi", "Adelaide", "Bergen", "Cusco", "Dublin", "Edinburgh",
    "Florence", "Gdansk", "Havana", "Istanbul", "Jaipur", "Kampala", "Ljubljana", "Manila",
    "Naples", "Osaka", "Porto", "Quebec City", "Riga", "Seville", "Tallinn", "Utrecht",
    "Vilnius", "Windhoek", "Yerevan", "Zagreb", "Accra", "Bilbao", "Cork", "Dakar",
    "Eindhoven", "Fukuoka", "Graz", "Helsinki", "Izmir", "Johannesburg", "Kazan", "Leipzig",
)

UNIVERSITIES = (
    "Northbridge University", "Halvorsen Institute of Technology", "the University of Eastmere",
    "Corrigan College", "Saint Aldric University", "the Royal Academy of Westvale",
    "Pinecrest University", "the University of Lowmarsh", "Ardent Polytechnic",
    "Silverlake University", "the Thornfield Institute", "Greymont University",
    "the University of Kingsreach", "Brightwater College", "Old Harbour University",
    "the Meridian Institute of Science", "Highgate Technical University", "Ravensmoor College",
    "the University of Southfold", "Larchwood University", "the Caldera Institute",
    "Emberfield University", "Stonebridge Polytechnic", "the University of Marlow Vale",
    "Aurora State University", "the Windmere Academy", "Oakridge University",
    "the University of Fairhaven", "Blue Fjord University", "Cobaltine Institute of Technology",
    "the University of Ostrava Heights", "Juniper Hill College", "Redcliff University",
    "the Tidewater Institute", "Hollowbrook University", "the University of Glenmoor",
)

MAJORS = (
    "mathematics", "physics", "chemistry", "biology", "computer science", "economics",
    "philosophy", "history", "linguistics", "architecture", "civil engineering",
    "mechanical engineering", "electrical engineering", "astronomy", "geology", "psychology",
    "sociology", "political science", "music theory", "art history", "statistics",
    "materials science", "oceanography", "neuroscience", "classics", "anthropology",
    "biochemistry", "journalism", "urban planning", "marine biology", "comparative literature",
    "aerospace engineering", "public health", "agronomy", "ecology", "law",
)

EMPLOYERS = (
    "Brightwater Analytics", "Orbital Forge", "Kestrel Logistics", "Northwind Pharmaceuticals",
    "Copperline Systems", "Halcyon Robotics", "Bluefin Energy", "Granite Peak Insurance",
    "Lumen Textiles", "Marigold Foods", "Silverthread Media", "Tidal Works", "Vantage Aerospace",
    "Willowmere Bank", "Zephyr Motors", "Amberstone Capital", "Cinderfield Games",
    "Driftwood Publishing", "Evergreen Biotech", "Foxglove Software", "Glasswing Optics",
    "Harborlight Shipping", "Ironbark Construction", "Juniper Telecom", "Keystone Minerals",
    "Larkfield Chemicals", "Moonrise Studios", "Nimbus Cloudworks", "Opaline Jewellers",
    "Pinnacle Rail", "Quasar Semiconductors", "Redwood Consulting", "Saffron Hotels",
    "Thistle Agritech", "Umbra Security", "Verdant Water", "Wavecrest Airlines",
    "Yellowstone Outfitters", "Zenith Instruments", "Acorn Health", "Beacon Hill Labs",
    "Cobalt Freight", "Dovetail Furniture", "Ember Batteries", "Fjordline Ferries",
)

MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
FIRST_BIRTH_DATE = datetime.date(1940, 1, 1)
LAST_BIRTH_DATE = datetime.date(1999, 12, 31)
_N_DATES = LAST_BIRTH_DATE.toordinal() - FIRST_BIRTH_DATE.toordinal() + 1
_MIDDLE_INITIALS = tuple(f"{c}." for c in "ABCDEFGHJKLMNPRSTVW")

# Each phrasing ends with the value and a period, so a probe's prompt is the text before it.
TEMPLATES = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "The date of birth of {name} is {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} spent their childhood in the city of their birth, {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received their education at {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} earned a degree in {value}.",
        "At university, {name} focused on {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} draws a salary from {value}.",
    ),
    "employer_city": (
        "{name} works in the city of {value}.",
        "The office of {name} is located in {value}.",
        "Every workday, {name} commutes to an office in {value}.",
    ),
}


@dataclasses.dataclass(frozen=True)
class Person:
  """A fictional person: a unique name and one value for each of ATTRIBUTES."""

  name: str
  birth_date: str  # "12 March 1987"
  birth_city: str
  university: str
  major: str
  employer: str
  employer_city: str

  def fact(self, attribute: str) -> str:
    if attribute not in ATTRIBUTES:
      raise ValueError(f"attribute must be one of {', '.join(ATTRIBUTES)}, got {attribute!r}")
    return getattr(self, attribute)


@dataclasses.dataclass(frozen=True)
class Probe:
  """One fact to recall: greedy decoding of `prompt` should produce `answer`."""

  name: str
  attribute: str
  prompt: str  # "Ada Varnell was born in"
  answer: str  # " Lisbon": the value with its leading space, no final period


def _values(attribute: str) -> tuple[str, ...] | None:
  """The values of a listed attribute (None for the birth date, drawn from a range of days)."""
  return {
      "birth_city": CITIES,
      "university": UNIVERSITIES,
      "major": MAJORS,
      "employer": EMPLOYERS,
      "employer_city": CITIES,
  }.get(attribute)


def chance_level(attribute: str) -> float:
  """The recall of a uniform guess: 1 / the number of values `attribute` takes."""
  if attribute not in ATTRIBUTES:
    raise ValueError(f"attribute must be one of {', '.join(ATTRIBUTES)}, got {attribute!r}")
  values = _values(attribute)
  return 1.0 / (_N_DATES if values is None else len(values))


def _check_size(n_people: int, seed: int) -> None:
  if not 1 <= n_people <= max_people():
    raise ValueError(f"data.people: must be in [1, {max_people()}], got {n_people}")
  if seed < 0:
    raise ValueError(f"seed: must be >= 0 for the knowledge corpus, got {seed}")


def max_people() -> int:
  """How many unique names there are: first x (no middle initial or one of 19) x last."""
  return len(FIRST_NAMES) * len(LAST_NAMES) * (1 + len(_MIDDLE_INITIALS))


def _format_date(day_offset: int) -> str:
  d = datetime.date.fromordinal(FIRST_BIRTH_DATE.toordinal() + int(day_offset))
  return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def make_people(n_people: int, seed: int) -> list[Person]:
  """`n_people` people with unique names; the same (n_people, seed) gives the same people anywhere.

  People are drawn one after another from one generator, so a smaller corpus of a seed is a
  prefix of a larger one. A name already taken gets a random middle initial. numpy's PCG64
  stream and `Generator.integers` are stable across platforms, so a seed's corpus is the same on
  every machine with the same numpy major version.
  """
  _check_size(n_people, seed)
  rng = np.random.default_rng(seed)
  listed = [_values(a) for a in ATTRIBUTES[1:]]
  highs = [len(FIRST_NAMES), len(LAST_NAMES), _N_DATES, *map(len, listed)]
  taken, people = set(), []
  for _ in range(n_people):
    first, last, day, *value_ids = rng.integers(highs)
    name = f"{FIRST_NAMES[first]} {LAST_NAMES[last]}"
    while name in taken:  # ends: n_people <= max_people() leaves a free name
      first, middle, last = rng.integers([len(FIRST_NAMES), len(_MIDDLE_INITIALS), len(LAST_NAMES)])
      name = f"{FIRST_NAMES[first]} {_MIDDLE_INITIALS[middle]} {LAST_NAMES[last]}"
    taken.add(name)
    facts = {a: values[i] for a, values, i in zip(ATTRIBUTES[1:], listed, value_ids)}
    people.append(Person(name=name, birth_date=_format_date(day), **facts))
  return people


def _template(person: Person, attribute: str) -> str:
  """The phrasing of `attribute` in every biography of `person` and in its probe.

  A hash (crc32: the same on every machine) rather than a draw, so probes know it without
  re-rendering the biography.
  """
  options = TEMPLATES[attribute]
  return options[zlib.crc32(f"{person.name}|{attribute}".encode()) % len(options)]


def biography(person: Person, rng: np.random.Generator) -> str:
  """One sentence per attribute, in an order drawn from `rng`."""
  sentences = [
      _template(person, a).format(name=person.name, value=person.fact(a)) for a in ATTRIBUTES
  ]
  return " ".join(sentences[i] for i in rng.permutation(len(sentences)))


def biographies(people: list[Person], seed: int) -> list[str]:
  """The corpus's documents: biography i draws its order from default_rng([seed, i]).

  One generator per person, so biography i does not depend on how many people come before.
  """
  return [biography(p, np.random.default_rng([seed, i])) for i, p in enumerate(people)]


def probes(people: list[Person]) -> list[Probe]:
  """Each person's six facts as completions, person by person, in ATTRIBUTES order."""
  out = []
  for person in people:
    for attribute in ATTRIBUTES:
      prompt = _template(person, attribute).split("{value}")[0].rstrip()
      out.append(
          Probe(
              name=person.name,
              attribute=attribute,
              prompt=prompt.format(name=person.name),
              answer=" " + person.fact(attribute),
          )
      )
  return out


def probe_ids(probe: Probe, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
  """(prompt ids, answer ids) as the tokenizer splits the whole sentence in a biography."""
  prompt = tokenizer.encode(probe.prompt)
  full = tokenizer.encode(probe.prompt + probe.answer)
  if full[: len(prompt)] != prompt:  # a token across the boundary; the answer's space prevents it
    raise ValueError(
        f"the {tokenizer.name} tokenizer merges the prompt {probe.prompt!r} into its answer "
        f"{probe.answer!r}: the probe cannot be scored token by token"
    )
  return prompt, full[len(prompt) :]


# ----------------------------------------------------------------------------------------------
# The corpus as a TFDS dataset.


def config_name(n_people: int, seed: int) -> str:
  return f"n{n_people}_seed{seed}"


def dataset_name(n_people: int, seed: int) -> str:
  """The name for `tfds.data_source` and `tfds_source`, e.g. "memjax_knowledge/n2000_seed0"."""
  return f"{MemjaxKnowledge.name}/{config_name(n_people, seed)}"


@dataclasses.dataclass
class KnowledgeConfig(tfds.core.BuilderConfig):
  n_people: int = 2000
  seed: int = 0


class MemjaxKnowledge(tfds.core.GeneratorBasedBuilder):
  """Biographies (`train`) and fact probes (`probe`) of `n_people` people drawn with `seed`.

  Any config named `n{N}_seed{S}` exists: each size and seed is its own directory.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [KnowledgeConfig(name=config_name(2000, 0), n_people=2000, seed=0)]
  _CONFIG_NAME = re.compile(r"n(\d+)_seed(\d+)")

  @classmethod
  def get_builder_config(cls, name, version=None):
    match = cls._CONFIG_NAME.fullmatch(name)
    if match is None:
      return super().get_builder_config(name, version)
    n_people, seed = map(int, match.groups())
    return KnowledgeConfig(name=name, n_people=n_people, seed=seed)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        description="Biographies of fictional people and completion probes of their facts.",
        features=tfds.features.FeaturesDict(
            {"text": text, "name": text, "attribute": text, "prompt": text, "answer": text}
        ),
        disable_shuffling=True,  # example i is person i; the pipeline shuffles
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    people = make_people(self.builder_config.n_people, self.builder_config.seed)
    return {split: self._generate_examples(people, split) for split in ("train", "probe")}

  def _generate_examples(self, people: list[Person], split: str):
    if split == "train":
      documents = biographies(people, self.builder_config.seed)
      for i, (person, text) in enumerate(zip(people, documents)):
        yield i, {"text": text, "name": person.name, "attribute": "", "prompt": "", "answer": ""}
    else:
      for i, p in enumerate(probes(people)):
        yield i, {"text": "", "name": p.name, "attribute": p.attribute, "prompt": p.prompt,
                  "answer": p.answer}


def build_knowledge_dataset(n_people: int, seed: int, data_dir: str | epath.PathLike) -> epath.Path:
  """Prepares `memjax_knowledge/n{N}_seed{S}` under `data_dir` unless it is there; its path.

  Building is atomic (TFDS renames a finished directory into place); when two processes race,
  the loser finds the winner's dataset and uses it. Under an object store's URI (gs://...), which
  ArrayRecord cannot write to, it is built in a local temporary folder and copied up, its
  `dataset_info.json` (what marks it prepared) last.
  """
  _check_size(n_people, seed)
  builder = MemjaxKnowledge(
      config=config_name(n_people, seed), data_dir=data_dir, file_format="array_record"
  )
  if paths.is_remote(data_dir) and not builder.is_prepared():
    with tempfile.TemporaryDirectory() as local:
      built = build_knowledge_dataset(n_people, seed, local)
      files = sorted(built.iterdir(), key=lambda f: f.name == "dataset_info.json")
      for f in files:
        (builder.data_path / f.name).write_bytes(f.read_bytes())
    return builder.data_path
  # Nothing is downloaded: TFDS still wants a download directory, and would otherwise look for a
  # copy of the dataset on its public GCS bucket first.
  offline = tfds.download.DownloadConfig(try_download_gcs=False)
  with tempfile.TemporaryDirectory() as downloads:
    try:  # returns at once if prepared
      builder.download_and_prepare(download_dir=downloads, download_config=offline)
    except OSError:
      if not builder.is_prepared():  # else another process renamed its copy into place first
        raise
  return builder.data_path
