// libyaml (Debian's libyaml-dev): the event parser under Sluice's YAML reader. Headers only; no code here.
#include <yaml.h>
