"""The packages import."""


def test_packages_import() -> None:
    import dagster_project  # noqa: F401
    import msif_assets  # noqa: F401
    import msif_core  # noqa: F401
