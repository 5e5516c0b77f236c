"""Carbon figures against hand-computed values, read from codecarbon's packaged data files directly."""
import json
from pathlib import Path

import pandas as pd
import pytest

from llmasos.energy import Contract, Embodied, EnergyError, emissions, grid_intensity

codecarbon = pytest.importorskip("codecarbon")
DATA = Path(codecarbon.__file__).parent / "data"


def _mix(iso):
    return json.loads((DATA / "private_infra" / "global_energy_mix.json").read_text())[iso]


def _cloud(provider, region):
    df = pd.read_csv(DATA / "cloud" / "impact.csv")
    return df[(df.provider == provider) & (df.region == region)].iloc[0]


def test_three_regions_by_hand():
    # France: 2 kWh at PUE 1.5 -> 3 kWh x the grid's gCO2e/kWh
    fra = _mix("FRA")
    r = emissions(2 * 3.6e6, "FRA", pue=1.5)
    assert r.facility_kwh == pytest.approx(3.0)
    assert r.location_g == pytest.approx(3.0 * fra["carbon_intensity"])
    assert r.market_g == r.location_g
    assert r.intensity.year == fra["year"] and "global_energy_mix.json" in r.intensity.source
    # United States: 0.5 kWh at PUE 1
    usa = _mix("USA")
    r = emissions(0.5 * 3.6e6, "usa")
    assert r.location_g == pytest.approx(0.5 * usa["carbon_intensity"])
    # a cloud region: Google Cloud europe-west4, 10 kWh at PUE 1.1
    row = _cloud("gcp", "europe-west4")
    r = emissions(10 * 3.6e6, "gcp:europe-west4", pue=1.1)
    assert r.location_g == pytest.approx(11.0 * float(row.impact))
    assert row.source in r.intensity.source and r.intensity.year == 2023
    # every line names a source; the grid and emission lines a year
    for line in r.lines:
        assert line.source
    assert all(x.year == 2023 for x in r.lines if x.name in ("grid intensity", "location-based", "market-based"))


def test_explicit_intensity_market_based_and_embodied():
    # 4 kWh at 400 g/kWh; 1 kWh covered by a REC (0 g), 1 kWh by a supplier factor of 100 g
    r = emissions(4 * 3.6e6, 400, pue=1.0,
                  contracts=[Contract(1.0, 0.0, "REC", "test REC", 2025), Contract(1.0, 100.0, "PPA", "test", 2025)])
    assert r.location_g == pytest.approx(1600.0)
    assert r.market_g == pytest.approx(0 + 100 + 2 * 400)
    # embodied: 1000 kg over 4 years, used for one day -> 1e6 g / (4 x 365.25)
    r = emissions(3.6e6, 0, embodied=Embodied(1000, 4, "assumption: vendor LCA", 2024), seconds=86400)
    assert r.embodied_g == pytest.approx(1e6 / (4 * 365.25))
    assert r.total_location_g == pytest.approx(r.embodied_g)
    assert any("straight-line" in x.note for x in r.lines)


def test_estimated_energy_is_labelled():
    r = emissions(3.6e6, 100, estimated=True)
    assert r.estimated and "estimated" in str(r)


def test_bad_input_is_explained():
    with pytest.raises(EnergyError, match="alpha-3"):
        grid_intensity("FR")
    with pytest.raises(EnergyError, match="not in codecarbon"):
        grid_intensity("gcp:mars-north1")
    with pytest.raises(EnergyError, match="PUE"):
        emissions(1.0, "FRA", pue=0.9)
    with pytest.raises(EnergyError, match="joules"):
        emissions(-1.0, "FRA")
    with pytest.raises(EnergyError, match="cover"):
        emissions(3.6e6, 100, contracts=[Contract(2.0)])
    with pytest.raises(EnergyError, match="seconds"):
        emissions(3.6e6, 100, embodied=Embodied(1, 1, "x"))


def test_carbon_cli(capsys):
    from llmasos.cli import main
    assert main(["carbon", "--kwh", "2", "--region", "FRA", "--pue", "1.5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["location_g"] == pytest.approx(3.0 * _mix("FRA")["carbon_intensity"])
    assert all(line["source"] for line in doc["lines"])
    assert main(["carbon", "--kwh", "1", "--region", "gcp:europe-west4"]) == 0
    out = capsys.readouterr().out
    assert "impact.csv" in out and "2023" in out
    assert main(["carbon", "--kwh", "1", "--region", "FR"]) == 2
    assert "alpha-3" in capsys.readouterr().err


def test_offsets_and_power_cli(tmp_path, capsys):
    from llmasos.cli import main
    db = str(tmp_path / "o.db")
    assert main(["offsets", "purchase", "--db", db, "--registry", "GS", "--serial", "S1", "--tonnes", "1",
                 "--vintage", "2024"]) == 0
    assert main(["offsets", "retire", "--db", db, "--registry", "GS", "--serial", "S1", "--tonnes", "0.5",
                 "--period", "2026", "--allow-over-offset", "--claim", "C1"]) == 0
    assert main(["offsets", "retire", "--db", db, "--registry", "GS", "--serial", "S1", "--tonnes", "0.1",
                 "--period", "2026", "--allow-over-offset", "--claim", "C1"]) == 2
    assert "double retirement" in capsys.readouterr().err
    assert main(["offsets", "retire", "--db", db, "--registry", "GS"]) == 2
    assert "--serial" in capsys.readouterr().err
    assert main(["offsets", "verify", "--db", db]) == 0
    capsys.readouterr()
    assert main(["power", "--simulate", "--eta", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["best_w"] == 375.0


@pytest.mark.parametrize("bad", ["-5", "nan", "inf", " -0.5 "])
def test_a_bad_number_as_a_string_is_refused_as_a_number(bad):
    # EnergyError is a ValueError: the numeric check must not be taken for "not a number, try a country code"
    with pytest.raises(EnergyError, match="finite gCO2e/kWh >= 0") as e:
        grid_intensity(bad)
    assert "country" not in str(e.value)
    assert grid_intensity(" 42 ").g_per_kwh == 42.0


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "0"])
def test_cpu_tdp_env_must_be_finite_and_positive(monkeypatch, bad):
    from llmasos.energy.meters import cpu_tdp
    monkeypatch.setenv("LLMASOS_CPU_TDP_W", bad)
    with pytest.raises(EnergyError, match="LLMASOS_CPU_TDP_W must be a finite number of watts > 0"):
        cpu_tdp()
    monkeypatch.setenv("LLMASOS_CPU_TDP_W", "95")
    assert cpu_tdp().watts == 95.0
