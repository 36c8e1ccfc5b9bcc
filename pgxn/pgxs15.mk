# The PGXS set-up every module under pgxn/ shares: include it from a module's Makefile after
# MODULES (or MODULE_big and OBJS) and PGFILEDESC. Builds against PostgreSQL 15 only; the .so
# stays in the module's directory and is loaded by absolute path, never installed.

REPO_ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))/..)
# The repository's pg_install layout first, then whatever pg_config is on PATH.
PG_CONFIG ?= $(firstword $(wildcard $(REPO_ROOT)/pg_install/v15/bin/pg_config) pg_config)

# Debian's PGXS enables LLVM bitcode (needs clang); nothing here is worth JIT-inlining.
override with_llvm = no

PG_CFLAGS += -Wall
ifeq ($(WERROR),1)
PG_CFLAGS += -Werror
endif

PGXS := $(shell $(PG_CONFIG) --pgxs)
ifeq ($(PGXS),)
$(error $(PG_CONFIG) --pgxs failed: is postgresql-server-dev-15 installed?)
endif
include $(PGXS)

ifneq ($(MAJORVERSION),15)
$(error $(notdir $(CURDIR)) needs PostgreSQL 15, $(PG_CONFIG) is $(MAJORVERSION))
endif
