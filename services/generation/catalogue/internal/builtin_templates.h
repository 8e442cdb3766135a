// The built-in prompt templates (services/generation/templates/*.yaml), compiled in as data by
// embed_templates.cmake. Each entry is (source name, YAML text), in file-name order.
#ifndef MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_BUILTIN_TEMPLATES_H_
#define MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_BUILTIN_TEMPLATES_H_

#include <string>
#include <utility>
#include <vector>

namespace montage::generation::internal {

std::vector<std::pair<std::string, std::string>> BuiltinTemplateSources();

}  // namespace montage::generation::internal

#endif  // MONTAGE_SERVICES_GENERATION_CATALOGUE_INTERNAL_BUILTIN_TEMPLATES_H_
