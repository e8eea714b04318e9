import pytest

# the deployment tests' shared helpers assert too: pytest explains their failures as it does
# a test module's (registered before any test module imports them)
pytest.register_assert_rewrite("tests.deploy_files")
