"""The provider and its algorithms' definitions: ids, parameters, help a person can follow."""

from __future__ import annotations

import pytest

from ..conftest import PROVIDER_ID

OURS = ("findanalogs", "trainencoder", "embedimages", "embedarea", "compareregions")


@pytest.fixture
def registry(analog_provider):
    from qgis.core import QgsApplication

    return QgsApplication.processingRegistry()


def test_provider_lists_the_algorithms(analog_provider):
    names = {alg.name() for alg in analog_provider.algorithms()}
    assert set(OURS) <= names
    assert analog_provider.id() == PROVIDER_ID
    assert not analog_provider.icon().isNull()
    assert analog_provider.supportedOutputVectorLayerExtensions() == ["gpkg"]
    try:
        import siamese_analog_plugin.processing.fewshot_algorithm  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        assert any(type(a).__name__ == "FewShotLandformAlgorithm" for a in analog_provider.algorithms())


@pytest.mark.parametrize("name", OURS)
def test_help_text_a_person_can_follow(registry, name):
    alg = registry.createAlgorithmById(f"{PROVIDER_ID}:{name}")
    assert alg is not None and alg.displayName() and alg.group() == "Mars analogs"
    assert alg.shortDescription()
    text = alg.shortHelpString()
    assert "How to use it" in text and len(text) > 600
    assert alg.helpUrl().startswith("https://")
    # Every input a person must fill is named in the help in their words.
    for param in alg.parameterDefinitions():
        if not param.flags() & param.FlagOptional and not param.isDestination() \
                and not param.flags() & param.FlagAdvanced and param.defaultValue() is None:
            first_word = param.description().split()[0].lower()
            assert first_word in text.lower(), (name, param.name())


def test_find_analogs_parameters(registry):
    from qgis.core import QgsProcessingParameterDefinition as Def

    alg = registry.createAlgorithmById(f"{PROVIDER_ID}:findanalogs")
    params = {p.name(): p for p in alg.parameterDefinitions()}
    for key in ("INPUT", "AREA", "REFERENCE", "CELL_SIZE", "STRIDE", "MIN_COVERAGE", "MODEL", "DEVICE",
                "BATCH_SIZE", "OUTPUT_RASTER", "OUTPUT_CELLS", "OUTPUT_REPORT"):
        assert key in params, key
    assert params["CELL_SIZE"].type() == "distance"
    assert params["AREA"].flags() & Def.FlagOptional
    assert params["BATCH_SIZE"].flags() & Def.FlagAdvanced
    assert not params["REFERENCE"].flags() & Def.FlagAdvanced
    assert params["OUTPUT_RASTER"].defaultFileExtension() == "tif"
    assert params["OUTPUT_CELLS"].defaultFileExtension() == "gpkg"
    outputs = {o.name(): o.type() for o in alg.outputDefinitions()}
    assert outputs["OUTPUT_REPORT"] == "outputHtml"  # shown in the results viewer
    assert outputs["OUTPUT_SITES"] == "outputVector"
    assert {"CELL_COUNT", "DEVICE_USED", "CELLS_PER_SECOND"} <= set(outputs)


def test_training_is_reported_when_missing(registry, monkeypatch, tmp_path):
    """A build without learning/training.py names what is missing instead of failing obscurely."""
    import sys

    import processing
    from qgis.core import QgsProcessingException

    (tmp_path / "data" / "a").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "siamese_analog_plugin.learning.training", None)
    with pytest.raises(QgsProcessingException, match="training module"):
        processing.run(f"{PROVIDER_ID}:trainencoder", {"INPUT": str(tmp_path / "data"), "EPOCHS": 1,
                                                        "OUTPUT": str(tmp_path / "m.pt")})


@pytest.mark.parametrize("name", OURS + ("fewshotlandforms",))
def test_help_panel_lines_are_not_broken_where_the_source_is(registry, name):
    """The help panel shows the source's line breaks inside sentences: the text is one line."""
    alg = registry.createAlgorithmById(f"{PROVIDER_ID}:{name}")
    text = alg.shortHelpString()
    assert "\n" not in text and "  " not in text
    assert "lower means more Mars-like" in text or name != "findanalogs"


@pytest.mark.parametrize("name", OURS + ("fewshotlandforms",))
def test_device_is_a_choice(registry, name):
    from qgis.core import QgsProcessingParameterEnum

    alg = registry.createAlgorithmById(f"{PROVIDER_ID}:{name}")
    device = alg.parameterDefinition("DEVICE")
    assert isinstance(device, QgsProcessingParameterEnum) and device.usesStaticStrings()
    assert device.options() == ["auto", "cpu", "cuda"] and device.defaultValue() == "auto"


def test_find_analogs_labels_are_short_and_have_no_html_notice(registry):
    """At the dialog's default size long labels pushed the reference's "..." button out of sight."""
    alg = registry.createAlgorithmById(f"{PROVIDER_ID}:findanalogs")
    main = [p for p in alg.parameterDefinitions() if not p.flags() & p.FlagAdvanced and not p.isDestination()]
    assert all(len(p.description()) <= 30 for p in main), [p.description() for p in main]
    assert not alg.hasHtmlOutputs()  # no "HTML output has been generated" after every run
