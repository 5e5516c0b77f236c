"""Carbon accounting: emissions = energy x PUE x grid intensity, location- and market-based (GHG Protocol
scope 2), plus optional embodied emissions of the hardware amortised over its life.

Grid intensity comes from codecarbon's packaged data, read through its ``DataSource`` (never retyped here):
  * a country by ISO 3166-1 alpha-3 code ("FRA", "USA"): ``global_energy_mix.json``'s ``carbon_intensity``
    (gCO2e/kWh) and ``year`` for that country;
  * a cloud region as "provider:region" ("gcp:europe-west4"): ``cloud/impact.csv``'s ``impact`` (gCO2e/kWh),
    whose source column names the provider's page (codecarbon 3.3 ships Google Cloud's 2023 figures: its
    pull request #610 copied GoogleCloudPlatform/region-carbon-info data/yearly/2023.csv);
  * an explicit number of gCO2e/kWh, with the source and year you give.
Every figure in a ``CarbonReport`` names its source and year.

Market-based: contracts (PPAs, RECs, supplier-specific factors) cover part of the energy at their own factor;
the rest is counted at the location-based factor, because codecarbon ships no residual-mix data (the report
states it). Embodied: the hardware's manufacturing emissions (kgCO2e, your figure and source) x window
duration / service life -- an optional line, its assumption stated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .errors import EnergyError

J_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Intensity:
    g_per_kwh: float
    region: str
    source: str
    year: Optional[int]

    def cite(self) -> str:
        return f"{self.source}, {self.year if self.year is not None else 'year not stated'}"


def _codecarbon():
    try:
        import codecarbon  # deferred: codecarbon (optional extra)
        from codecarbon.input import DataSource
    except ImportError:
        raise EnergyError("grid intensity by country or cloud region needs codecarbon's data: pip install "
                          "'llmasos[energy]'; or give an explicit intensity in gCO2e/kWh") from None
    return codecarbon.__version__, DataSource()


def countries() -> dict:
    """{ISO alpha-3: (country name, gCO2e/kWh, year)} from codecarbon's packaged energy mix."""
    _, ds = _codecarbon()
    return {k: (v.get("country_name", k), v["carbon_intensity"], v.get("year"))
            for k, v in ds.get_global_energy_mix_data().items() if "carbon_intensity" in v}


def cloud_regions() -> dict:
    """{"provider:region": (country ISO, gCO2e/kWh, source)} from codecarbon's packaged cloud table."""
    _, ds = _codecarbon()
    df = ds.get_cloud_emissions_data()
    return {f"{r.provider}:{r.region}": (r.countryIsoCode, float(r.impact), r.source) for r in df.itertuples()}


# codecarbon's cloud/impact.csv carries no year column; the year of the data its version ships
_CLOUD_YEAR = {"gcp": 2023}


def grid_intensity(region: Union[str, float, int], *, source: Optional[str] = None,
                   year: Optional[int] = None) -> Intensity:
    """The location-based grid intensity of ``region``: an ISO alpha-3 country code, "provider:region", or a
    number of gCO2e/kWh (then ``source`` and ``year`` say where it comes from)."""
    if isinstance(region, (int, float)) and not isinstance(region, bool):
        g = float(region)
        if not math.isfinite(g) or g < 0:
            raise EnergyError(f"an explicit grid intensity must be a finite gCO2e/kWh >= 0, got {region!r}")
        return Intensity(g, f"explicit {g:g} gCO2e/kWh", source or "given by the user", year)
    if not isinstance(region, str) or not region.strip():
        raise EnergyError(f"region must be an ISO alpha-3 country code ('FRA'), 'provider:region' "
                          f"('gcp:europe-west4') or gCO2e/kWh as a number, got {region!r}")
    r = region.strip()
    try:
        g = float(r)
    except ValueError:
        g = None        # not a number: a country code or a cloud region
    if g is not None:   # validated outside the try: its EnergyError (a ValueError) must reach the caller
        return grid_intensity(g, source=source, year=year)
    version, ds = _codecarbon()
    if ":" in r:
        provider, name = (s.strip().lower() for s in r.split(":", 1))
        table = cloud_regions()
        key = f"{provider}:{name}"
        if key not in table:
            providers = sorted({k.split(":")[0] for k in table})
            near = sorted(k for k in table if k.startswith(provider + ":"))
            raise EnergyError(f"cloud region {r!r} is not in codecarbon {version}'s cloud table (providers: "
                              f"{', '.join(providers)}; {len(near)} regions for {provider!r}"
                              f"{': ' + ', '.join(near[:8]) + ', ...' if near else ''}); use the region's "
                              f"country code or an explicit gCO2e/kWh")
        iso, g, src = table[key]
        return Intensity(g, key, f"codecarbon {version} data/cloud/impact.csv <- {src}",
                         _CLOUD_YEAR.get(provider))
    code = r.upper()
    mix = ds.get_global_energy_mix_data()
    if len(code) != 3 or code not in mix:
        hint = " (ISO alpha-3, e.g. 'FRA' not 'FR')" if len(code) == 2 else ""
        raise EnergyError(f"unknown country code {r!r}{hint}: codecarbon {version}'s energy mix has "
                          f"{len(mix)} countries by ISO 3166-1 alpha-3 code")
    row = mix[code]
    return Intensity(float(row["carbon_intensity"]), code,
                     f"codecarbon {version} data/private_infra/global_energy_mix.json "
                     f"({row.get('country_name', code)})",
                     row.get("year"))


@dataclass(frozen=True)
class Contract:
    """A market instrument for the market-based figure: ``kwh`` covered at ``g_per_kwh`` (0 for RECs and
    renewable PPAs), with its source and year."""
    kwh: float
    g_per_kwh: float = 0.0
    kind: str = "REC"
    source: str = "contract"
    year: Optional[int] = None

    def __post_init__(self):
        if not (self.kwh >= 0 and math.isfinite(self.kwh)):
            raise EnergyError(f"contract kwh must be >= 0, got {self.kwh!r}")
        if not (self.g_per_kwh >= 0 and math.isfinite(self.g_per_kwh)):
            raise EnergyError(f"contract g_per_kwh must be >= 0, got {self.g_per_kwh!r}")


@dataclass(frozen=True)
class Embodied:
    """Manufacturing emissions of the hardware used (kgCO2e per unit, units, service life): amortised as
    kg x units x duration / life. The figure and its source are yours: nothing here guesses them."""
    kg_co2e: float
    life_years: float
    source: str
    year: Optional[int] = None
    units: int = 1

    def __post_init__(self):
        if not (self.kg_co2e >= 0 and self.life_years > 0 and self.units >= 1):
            raise EnergyError(f"embodied emissions need kg_co2e >= 0, life_years > 0 and units >= 1, got "
                              f"{self.kg_co2e}, {self.life_years}, {self.units}")


@dataclass(frozen=True)
class Line:
    name: str
    value: float
    unit: str
    source: str
    year: Optional[int]
    note: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "unit": self.unit, "source": self.source,
                "year": self.year, "note": self.note}


@dataclass
class CarbonReport:
    energy_kwh: float
    pue: float
    facility_kwh: float
    intensity: Intensity
    location_g: float
    market_g: float
    embodied_g: Optional[float]
    estimated: bool
    lines: list = field(default_factory=list)

    @property
    def total_location_g(self) -> float:
        return self.location_g + (self.embodied_g or 0.0)

    @property
    def total_market_g(self) -> float:
        return self.market_g + (self.embodied_g or 0.0)

    def as_dict(self) -> dict:
        return {"energy_kwh": self.energy_kwh, "pue": self.pue, "facility_kwh": self.facility_kwh,
                "region": self.intensity.region, "grid_g_per_kwh": self.intensity.g_per_kwh,
                "location_g": self.location_g, "market_g": self.market_g, "embodied_g": self.embodied_g,
                "total_location_g": self.total_location_g, "total_market_g": self.total_market_g,
                "estimated": self.estimated, "lines": [x.as_dict() for x in self.lines]}

    def __str__(self) -> str:
        out = []
        for x in self.lines:
            tag = f" ({x.note})" if x.note else ""
            year = f"; {x.year}" if x.year is not None else ("; year not stated" if x.name == "grid intensity" else "")
            out.append(f"{x.name:<22} {x.value:>12.6g} {x.unit:<10} [{x.source}{year}]{tag}")
        return "\n".join(out)


def emissions(energy_j: float, region: Union[str, float, int, Intensity], *, pue: float = 1.0,
              pue_source: Optional[str] = None,
              contracts: Sequence[Contract] = (), embodied: Optional[Embodied] = None, seconds: float = 0.0,
              estimated: bool = False, energy_source: str = "llmasos.energy.measure") -> CarbonReport:
    """The carbon figures of ``energy_j`` joules used in ``region`` (see the module docstring).

    seconds: the duration the energy was used over (for the embodied line); estimated: the energy is an
    estimate (every line then says so)."""
    if not (isinstance(energy_j, (int, float)) and math.isfinite(energy_j) and energy_j >= 0):
        raise EnergyError(f"energy must be a finite number of joules >= 0, got {energy_j!r}")
    if not (isinstance(pue, (int, float)) and pue >= 1.0 and math.isfinite(pue)):
        raise EnergyError(f"PUE must be a number >= 1.0 (facility energy / IT energy), got {pue!r}")
    if embodied is not None and not seconds > 0:
        raise EnergyError("the embodied line amortises over the window's duration: pass seconds > 0")
    inten = region if isinstance(region, Intensity) else grid_intensity(region)
    if pue_source is None:
        pue_source = "assumed 1.0 (energy at the device, no facility overhead)" if pue == 1.0 else "given"
    kwh = energy_j / J_PER_KWH
    fac = kwh * pue
    loc = fac * inten.g_per_kwh
    covered = sum(c.kwh for c in contracts)
    if covered > fac * (1 + 1e-12):
        raise EnergyError(f"contracts cover {covered:g} kWh but the facility used only {fac:g} kWh: a contract "
                          f"can be claimed once, for energy actually used (split it across periods)")
    market = sum(c.kwh * c.g_per_kwh for c in contracts) + (fac - covered) * inten.g_per_kwh
    est = " -- estimated energy" if estimated else ""
    how = "estimated" if estimated else ("measured" if energy_source.startswith("llmasos.energy") else "given")
    lines = [Line("energy (IT)", kwh, "kWh", energy_source, None, how),
             Line("PUE", pue, "", pue_source, None),
             Line("energy (facility)", fac, "kWh", "energy x PUE", None, "estimated" if estimated else ""),
             Line("grid intensity", inten.g_per_kwh, "gCO2e/kWh", inten.source, inten.year, inten.region),
             Line("location-based", loc, "gCO2e", inten.source, inten.year, "facility kWh x grid intensity" + est)]
    for c in contracts:
        lines.append(Line(f"contract ({c.kind})", c.kwh, "kWh", c.source, c.year, f"{c.g_per_kwh:g} gCO2e/kWh"))
    lines.append(Line("market-based", market, "gCO2e", inten.source if not contracts else "contracts + grid",
                      inten.year,
                      ("uncovered energy at the location-based factor (no residual-mix data)" if contracts else
                       "no contracts: equals location-based") + est))
    emb = None
    if embodied is not None:
        emb = embodied.kg_co2e * 1000 * embodied.units * seconds / (embodied.life_years * 365.25 * 86400)
        lines.append(Line("embodied (amortised)", emb, "gCO2e", embodied.source, embodied.year,
                          f"{embodied.units} x {embodied.kg_co2e:g} kg over {embodied.life_years:g} years, "
                          f"straight-line by time ({seconds:g} s)"))
    return CarbonReport(kwh, pue, fac, inten, loc, market, emb, estimated, lines)
