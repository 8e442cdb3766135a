#include "services/speech/segmenter.h"

#include <libxml/parser.h>
#include <libxml/tree.h>
#include <libxml/xmlerror.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "common/status.h"

namespace montage::speech {
namespace {

// ---------------------------------------------------------------------------------------------
// UTF-8

constexpr size_t kValidUtf8 = absl::string_view::npos;

// Offset of the first byte that does not start a well-formed UTF-8 sequence (RFC 3629: no
// overlong forms, no surrogates, nothing above U+10FFFF), or kValidUtf8.
size_t FindInvalidUtf8(absl::string_view s) {
  auto byte = [&s](size_t i) { return static_cast<unsigned char>(s[i]); };
  auto continuation = [&](size_t i, unsigned char lo, unsigned char hi) {
    return i < s.size() && byte(i) >= lo && byte(i) <= hi;
  };
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = byte(i);
    size_t len = 0;
    if (c < 0x80) {
      len = 1;
    } else if (c >= 0xC2 && c <= 0xDF) {
      if (continuation(i + 1, 0x80, 0xBF)) len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      const unsigned char lo = c == 0xE0 ? 0xA0 : 0x80;
      const unsigned char hi = c == 0xED ? 0x9F : 0xBF;
      if (continuation(i + 1, lo, hi) && continuation(i + 2, 0x80, 0xBF)) len = 3;
    } else if (c >= 0xF0 && c <= 0xF4) {
      const unsigned char lo = c == 0xF0 ? 0x90 : 0x80;
      const unsigned char hi = c == 0xF4 ? 0x8F : 0xBF;
      if (continuation(i + 1, lo, hi) && continuation(i + 2, 0x80, 0xBF) &&
          continuation(i + 3, 0x80, 0xBF)) {
        len = 4;
      }
    }
    if (len == 0) return i;
    i += len;
  }
  return kValidUtf8;
}

absl::Status CheckUtf8(absl::string_view text) {
  const size_t bad = FindInvalidUtf8(text);
  if (bad == kValidUtf8) return absl::OkStatus();
  return InvalidFieldError("text", absl::StrCat("not valid UTF-8 at byte ", bad));
}

bool IsContinuationByte(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Code points in valid UTF-8.
size_t CodePoints(absl::string_view s) {
  return static_cast<size_t>(
      std::count_if(s.begin(), s.end(), [](char c) { return !IsContinuationByte(c); }));
}

// The code point starting at s[i] of valid UTF-8; sets *len to its byte length.
char32_t DecodeAt(absl::string_view s, size_t i, size_t* len) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    *len = 1;
    return c;
  }
  size_t n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
  n = std::min(n, s.size() - i);
  char32_t cp = c & (0x7F >> n);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  *len = n;
  return cp;
}

// ---------------------------------------------------------------------------------------------
// Whitespace

// XML whitespace plus \v and \f; all ASCII, so it never matches inside a multi-byte sequence.
bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

// ---------------------------------------------------------------------------------------------
// Sentences within one block of normalised text (single spaces, trimmed)

// A byte range [begin, end).
struct Span {
  size_t begin = 0;
  size_t end = 0;
};

enum class Mark { kNone, kPeriod, kEllipsis, kStrong, kCjk };

Mark ClassifyMark(char32_t cp) {
  switch (cp) {
    case U'.':
      return Mark::kPeriod;
    case U'\u2026':  // …
      return Mark::kEllipsis;
    case U'!':
    case U'?':
      return Mark::kStrong;
    case U'\u3002':  // 。
    case U'\uFF01':  // ！
    case U'\uFF1F':  // ？
      return Mark::kCjk;
    default:
      return Mark::kNone;
  }
}

// Closing quotes and brackets that may follow the end of a sentence.
bool IsCloser(char32_t cp) {
  switch (cp) {
    case U'"':
    case U'\'':
    case U')':
    case U']':
    case U'}':
    case U'\u00BB':  // »
    case U'\u2019':  // ’
    case U'\u201D':  // ”
    case U'\u203A':  // ›
    case U'\u3009':  // 〉
    case U'\u300B':  // 》
    case U'\u300D':  // 」
    case U'\u300F':  // 』
    case U'\u3011':  // 】
    case U'\uFF09':  // ）
      return true;
    default:
      return false;
  }
}

// Opening quotes and brackets that may precede a word.
bool IsOpener(char32_t cp) {
  switch (cp) {
    case U'"':
    case U'\'':
    case U'(':
    case U'[':
    case U'{':
    case U'\u00A1':  // ¡
    case U'\u00AB':  // «
    case U'\u00BF':  // ¿
    case U'\u2018':  // ‘
    case U'\u201C':  // “
      return true;
    default:
      return false;
  }
}

// Words that a '.' follows without ending the sentence. Case-sensitive: "No." is an
// abbreviation, "no." is not.
bool IsAbbreviation(absl::string_view word) {
  static constexpr absl::string_view kAbbreviations[] = {
      "Mr", "Mrs", "Ms", "Dr", "Prof", "St", "Jr", "Sr", "vs", "etc", "e.g", "i.e", "cf",
  };
  return std::find(std::begin(kAbbreviations), std::end(kAbbreviations), word) !=
         std::end(kAbbreviations);
}

// Sorted, disjoint ranges of text that must not be split (SSML elements such as <sub>).
class Unbreakable {
 public:
  explicit Unbreakable(const std::vector<Span>& spans) : spans_(spans) {}

  // The range holding byte `pos`, or nullptr.
  const Span* Holding(size_t pos) const {
    auto it = std::upper_bound(spans_.begin(), spans_.end(), pos,
                               [](size_t p, const Span& s) { return p < s.begin; });
    if (it == spans_.begin()) return nullptr;
    --it;
    return pos < it->end ? &*it : nullptr;
  }

  // The range that cutting just before byte `pos` would split, or nullptr.
  const Span* Splits(size_t pos) const {
    const Span* span = Holding(pos);
    return span != nullptr && span->begin < pos ? span : nullptr;
  }

 private:
  const std::vector<Span>& spans_;
};

// Decides whether the run of marks text[run_begin, run_end), followed by closers up to `after`,
// ends a sentence. `after` is the position of a space (the end of the block is handled by the
// caller). `sentence_begin` bounds the search for the word before the mark.
bool EndsSentence(absl::string_view text, size_t sentence_begin, size_t run_begin, size_t run_end,
                  size_t after, bool strong) {
  const char next = after + 1 < text.size() ? text[after + 1] : '\0';
  const bool lower_next = absl::ascii_islower(static_cast<unsigned char>(next));
  // A quotation goes on: "Stop!" he said.
  if (after > run_end && lower_next) return false;
  if (strong) return true;
  const bool single_period = run_end == run_begin + 1 && text[run_begin] == '.';
  if (!single_period) {
    // An ellipsis: "Wait… what?" goes on, "Wait… What?" starts again.
    return !lower_next;
  }
  size_t word_begin = run_begin;
  while (word_begin > sentence_begin && text[word_begin - 1] != ' ') --word_begin;
  while (word_begin < run_begin) {
    size_t len = 0;
    if (!IsOpener(DecodeAt(text, word_begin, &len))) break;
    word_begin += len;
  }
  const absl::string_view word = text.substr(word_begin, run_begin - word_begin);
  // A capital initial: "J. R. R. Tolkien".
  if (word.size() == 1 && absl::ascii_isupper(static_cast<unsigned char>(word[0]))) return false;
  if (IsAbbreviation(word)) return false;
  // A dotted abbreviation in mid-sentence: "the U.S.A. is", "a Ph.D. in".
  if (word.find('.') != absl::string_view::npos && lower_next) return false;
  if (word == "No" && absl::ascii_isdigit(static_cast<unsigned char>(next))) return false;
  return true;
}

// Splits a block into sentences. The space between two sentences belongs to neither.
std::vector<Span> FindSentences(absl::string_view text, const Unbreakable& unbreakable) {
  std::vector<Span> sentences;
  size_t start = 0;
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    if (const Span* span = unbreakable.Holding(i)) {
      i = span->end;
      continue;
    }
    size_t len = 0;
    if (ClassifyMark(DecodeAt(text, i, &len)) == Mark::kNone) {
      i += len;
      continue;
    }
    const size_t run_begin = i;
    bool strong = false;
    bool cjk = false;
    size_t j = i;
    while (j < n && unbreakable.Holding(j) == nullptr) {
      const Mark mark = ClassifyMark(DecodeAt(text, j, &len));
      if (mark == Mark::kNone) break;
      strong = strong || mark == Mark::kStrong || mark == Mark::kCjk;
      cjk = cjk || mark == Mark::kCjk;
      j += len;
    }
    const size_t run_end = j;
    while (j < n && unbreakable.Holding(j) == nullptr && IsCloser(DecodeAt(text, j, &len))) {
      j += len;
    }
    if (j == n) break;  // The block ends here anyway.
    const bool space = text[j] == ' ';
    const bool ends =
        cjk || (space && EndsSentence(text, start, run_begin, run_end, /*after=*/j, strong));
    if (!ends) {
      i = j;
      continue;
    }
    sentences.push_back({start, j});
    start = space ? j + 1 : j;
    i = start;
  }
  sentences.push_back({start, n});
  return sentences;
}

// Cuts `sentence` into pieces of at most max_chars code points, at the last space that allows it
// or, failing that, at a code-point boundary outside unbreakable ranges.
void CutToLength(absl::string_view text, Span sentence, size_t max_chars,
                 const Unbreakable& unbreakable, std::vector<Span>& pieces) {
  size_t a = sentence.begin;
  const size_t b = sentence.end;
  while (max_chars > 0 && a < b) {
    // q: the byte just after max_chars code points from a.
    size_t q = a;
    size_t count = 0;
    while (q < b && count < max_chars) {
      ++q;
      while (q < b && IsContinuationByte(text[q])) ++q;
      ++count;
    }
    if (q == b) break;
    size_t cut = q;
    while (cut > a && (text[cut] != ' ' || unbreakable.Holding(cut) != nullptr)) --cut;
    if (cut > a) {
      pieces.push_back({a, cut});
      a = cut + 1;
      continue;
    }
    cut = q;
    if (const Span* span = unbreakable.Splits(cut)) cut = span->begin > a ? span->begin : span->end;
    pieces.push_back({a, cut});
    a = cut;
    // An unbreakable range may end just before a space, which belongs to neither piece.
    if (a < b && text[a] == ' ') ++a;
  }
  if (a < b) pieces.push_back({a, b});
}

// Segments of one block of normalised text (non-empty, single spaces, trimmed). `unbreakable` is
// relative to the block. Returns non-empty, ordered ranges.
std::vector<Span> SplitBlock(absl::string_view text, const std::vector<Span>& unbreakable_spans,
                             const SegmenterOptions& options) {
  const Unbreakable unbreakable(unbreakable_spans);
  std::vector<Span> pieces;
  for (const Span& sentence : FindSentences(text, unbreakable)) {
    CutToLength(text, sentence, options.max_chars, unbreakable, pieces);
  }
  if (options.min_chars == 0 || pieces.empty()) return pieces;
  std::vector<Span> segments;
  Span current = pieces[0];
  size_t current_chars = CodePoints(text.substr(current.begin, current.end - current.begin));
  for (size_t k = 1; k < pieces.size(); ++k) {
    const Span& next = pieces[k];
    const size_t next_chars = CodePoints(text.substr(next.begin, next.end - next.begin));
    const size_t joined_chars = current_chars + (next.begin - current.end) + next_chars;
    if (current_chars < options.min_chars &&
        (options.max_chars == 0 || joined_chars <= options.max_chars)) {
      current.end = next.end;
      current_chars = joined_chars;
      continue;
    }
    segments.push_back(current);
    current = next;
    current_chars = next_chars;
  }
  segments.push_back(current);
  return segments;
}

// ---------------------------------------------------------------------------------------------
// SSML

constexpr absl::string_view kSsmlNamespace = "http://www.w3.org/2001/10/synthesis";

absl::string_view View(const xmlChar* s) {
  return s == nullptr ? absl::string_view() : absl::string_view(reinterpret_cast<const char*>(s));
}

void InitLibxml() {
  static std::once_flag once;
  std::call_once(once, [] { xmlInitParser(); });
}

struct DocDeleter {
  void operator()(xmlDoc* doc) const { xmlFreeDoc(doc); }
};
struct ParserCtxtDeleter {
  void operator()(xmlParserCtxt* ctxt) const { xmlFreeParserCtxt(ctxt); }
};
using DocPtr = std::unique_ptr<xmlDoc, DocDeleter>;

// What the parser callbacks report, reached through the context's _private.
struct ParseReport {
  bool doctype = false;
  bool error = false;
  int line = 0;
  std::string message;
};

// Keeps the first error; structured and per context, so nothing reaches the global handler.
void OnParseError(void* user_data, xmlErrorPtr error) {
  auto* ctxt = static_cast<xmlParserCtxt*>(user_data);
  auto* report = static_cast<ParseReport*>(ctxt->_private);
  if (report == nullptr || report->error || error == nullptr || error->level < XML_ERR_ERROR) {
    return;
  }
  report->error = true;
  report->line = error->line;
  report->message =
      std::string(absl::StripAsciiWhitespace(error->message == nullptr ? "" : error->message));
}

// Called at the start of any DOCTYPE, before its internal subset is read: stops the parser so
// that no entity is declared, let alone expanded.
void OnDoctype(void* user_data, const xmlChar*, const xmlChar*, const xmlChar*) {
  auto* ctxt = static_cast<xmlParserCtxt*>(user_data);
  static_cast<ParseReport*>(ctxt->_private)->doctype = true;
  xmlStopParser(ctxt);
}

absl::StatusOr<DocPtr> ParseSsml(absl::string_view ssml) {
  if (ssml.size() > static_cast<size_t>(INT_MAX)) {
    return InvalidFieldError("text", "SSML is too large");
  }
  InitLibxml();
  std::unique_ptr<xmlParserCtxt, ParserCtxtDeleter> ctxt(xmlNewParserCtxt());
  if (ctxt == nullptr) return absl::ResourceExhaustedError("libxml2: out of memory");
  ParseReport report;
  ctxt->_private = &report;
  ctxt->sax->serror = &OnParseError;
  ctxt->sax->internalSubset = &OnDoctype;
  // No XML_PARSE_NOENT, DTDLOAD or HUGE: entities are never substituted or loaded. The input was
  // checked to be UTF-8, so an encoding declaration is ignored.
  constexpr int kOptions = XML_PARSE_NONET | XML_PARSE_NOCDATA | XML_PARSE_IGNORE_ENC;
  DocPtr doc(xmlCtxtReadMemory(ctxt.get(), ssml.data(), static_cast<int>(ssml.size()), nullptr,
                               "UTF-8", kOptions));
  if (report.doctype || (doc != nullptr && doc->intSubset != nullptr)) {
    return InvalidFieldError("text", "SSML must not have a DOCTYPE");
  }
  if (report.error || doc == nullptr) {
    return InvalidFieldError("text",
                             absl::StrCat("malformed SSML at line ", report.line, ": ",
                                          report.error ? report.message : "cannot be parsed"));
  }
  const xmlNode* root = xmlDocGetRootElement(doc.get());
  const bool speak = root != nullptr && View(root->name) == "speak" &&
                     (root->ns == nullptr || View(root->ns->href) == kSsmlNamespace);
  if (!speak) return InvalidFieldError("text", "SSML must have <speak> as its root element");
  return doc;
}

bool IsBlockElement(absl::string_view name) {
  return name == "p" || name == "s" || name == "paragraph" || name == "sentence";
}

bool IsParagraphElement(absl::string_view name) { return name == "p" || name == "paragraph"; }

// Elements whose content is not read as it stands (an alias, a pronunciation, an interpretation,
// a fallback), so that half of one would mean something else.
bool IsUnbreakableElement(absl::string_view name) {
  return name == "sub" || name == "say-as" || name == "phoneme" || name == "audio";
}

// XML escaping: & < > always; inside an attribute value also " and tab, newline, CR.
void AppendEscaped(absl::string_view text, bool attribute, std::string& out) {
  for (char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += attribute ? "&quot;" : "\"";
        break;
      // Whitespace in attribute values would be normalised to spaces by a parser.
      case '\t':
        out += attribute ? "&#9;" : "\t";
        break;
      case '\n':
        out += attribute ? "&#10;" : "\n";
        break;
      case '\r':
        out += attribute ? "&#13;" : "\r";
        break;
      default:
        out += c;
    }
  }
}

void AppendEscapedText(absl::string_view text, std::string& out) {
  AppendEscaped(text, false, out);
}

void AppendEscapedAttribute(absl::string_view value, std::string& out) {
  AppendEscaped(value, true, out);
}

void AppendQualifiedName(const xmlNs* ns, const xmlChar* name, std::string& out) {
  if (ns != nullptr && ns->prefix != nullptr) absl::StrAppend(&out, View(ns->prefix), ":");
  absl::StrAppend(&out, View(name));
}

void AppendStartTag(const xmlNode* node, bool empty, std::string& out) {
  out += '<';
  AppendQualifiedName(node->ns, node->name, out);
  for (const xmlNs* ns = node->nsDef; ns != nullptr; ns = ns->next) {
    out += " xmlns";
    if (ns->prefix != nullptr) absl::StrAppend(&out, ":", View(ns->prefix));
    out += "=\"";
    AppendEscapedAttribute(View(ns->href), out);
    out += '"';
  }
  for (const xmlAttr* attr = node->properties; attr != nullptr; attr = attr->next) {
    out += ' ';
    AppendQualifiedName(attr->ns, attr->name, out);
    out += "=\"";
    for (const xmlNode* child = attr->children; child != nullptr; child = child->next) {
      if (child->type == XML_TEXT_NODE) AppendEscapedAttribute(View(child->content), out);
    }
    out += '"';
  }
  out += empty ? "/>" : ">";
}

void AppendEndTag(const xmlNode* node, std::string& out) {
  out += "</";
  AppendQualifiedName(node->ns, node->name, out);
  out += '>';
}

bool IsTextNode(const xmlNode* node) {
  return node->type == XML_TEXT_NODE || node->type == XML_CDATA_SECTION_NODE;
}

// Holds no text and no element (comments do not count): written as <name/>.
bool IsEmptyElement(const xmlNode* node) {
  for (const xmlNode* child = node->children; child != nullptr; child = child->next) {
    if (IsTextNode(child) || child->type == XML_ELEMENT_NODE) return false;
  }
  return true;
}

// Text with whitespace runs collapsed to one space, not trimmed (the element may sit between
// words).
void AppendCollapsed(absl::string_view text, std::string& out) {
  bool space = false;
  for (char c : text) {
    if (IsSpace(c)) {
      space = true;
      continue;
    }
    if (space) out += ' ';
    space = false;
    out += c;
  }
  if (space) out += ' ';
}

// An element and everything in it, comments and processing instructions left out.
void AppendSubtree(const xmlNode* node, std::string& out) {
  if (IsEmptyElement(node)) {
    AppendStartTag(node, /*empty=*/true, out);
    return;
  }
  AppendStartTag(node, /*empty=*/false, out);
  for (const xmlNode* child = node->children; child != nullptr; child = child->next) {
    if (IsTextNode(child)) {
      std::string collapsed;
      AppendCollapsed(View(child->content), collapsed);
      AppendEscapedText(collapsed, out);
    } else if (child->type == XML_ELEMENT_NODE) {
      AppendSubtree(child, out);
    }
  }
  AppendEndTag(node, out);
}

// Whether an element holds an element or a word; if not, it is written out as it stands.
bool HasContent(const xmlNode* node) {
  for (const xmlNode* child = node->children; child != nullptr; child = child->next) {
    if (child->type == XML_ELEMENT_NODE) return true;
    if (IsTextNode(child) &&
        !std::all_of(View(child->content).begin(), View(child->content).end(), IsSpace)) {
      return true;
    }
  }
  return false;
}

void AppendTextContent(const xmlNode* node, std::string& out) {
  for (const xmlNode* child = node->children; child != nullptr; child = child->next) {
    if (IsTextNode(child)) {
      absl::StrAppend(&out, View(child->content));
    } else if (child->type == XML_ELEMENT_NODE) {
      AppendTextContent(child, out);
    }
  }
}

// The document below the root, flattened into the text it speaks (normalised, as one string)
// and the markup between, with the blocks that <p> and <s> delimit.
class SsmlFlattener {
 public:
  enum class Kind { kText, kOpen, kClose, kElement };
  struct Token {
    Kind kind;
    // The element of kOpen, kClose and kElement (a whole subtree kept as it stands).
    const xmlNode* node = nullptr;
    // kText and kElement: the range of text() they speak. kOpen, kClose: where they sit.
    size_t begin = 0;
    size_t end = 0;
  };
  struct Block {
    Span text;
    bool paragraph_end = false;
    // Unbreakable elements, relative to text.begin.
    std::vector<Span> unbreakable;
  };

  explicit SsmlFlattener(const xmlNode* root) {
    Walk(root);
    EndBlock(/*paragraph=*/false);
  }

  const std::string& text() const { return text_; }
  const std::vector<Token>& tokens() const { return tokens_; }
  const std::vector<Block>& blocks() const { return blocks_; }

 private:
  void Walk(const xmlNode* parent) {
    for (const xmlNode* node = parent->children; node != nullptr; node = node->next) {
      if (IsTextNode(node)) {
        AppendText(View(node->content));
        continue;
      }
      if (node->type != XML_ELEMENT_NODE) continue;
      const absl::string_view name = View(node->name);
      if (IsUnbreakableElement(name) || !HasContent(node)) {
        AppendElement(node);
        continue;
      }
      const bool block = IsBlockElement(name);
      if (block) EndBlock(/*paragraph=*/false);
      tokens_.push_back({Kind::kOpen, node, text_.size(), text_.size()});
      Walk(node);
      tokens_.push_back({Kind::kClose, node, text_.size(), text_.size()});
      if (block) EndBlock(IsParagraphElement(name));
    }
  }

  void AppendText(absl::string_view text) {
    const size_t start = text_.size();
    for (char c : text) {
      if (IsSpace(c)) {
        // The first space of a run is kept (so it stays before any markup that follows); the
        // block's last one is trimmed in EndBlock.
        if (!block_has_text_ || last_was_space_) continue;
        text_ += ' ';
        last_was_space_ = true;
      } else {
        StartTextIfNeeded();
        text_ += c;
        last_was_space_ = false;
      }
    }
    if (text_.size() == start) return;
    if (!tokens_.empty() && tokens_.back().kind == Kind::kText && tokens_.back().end == start) {
      tokens_.back().end = text_.size();
    } else {
      tokens_.push_back({Kind::kText, nullptr, start, text_.size()});
    }
  }

  // An element kept whole. Whitespace at its edges separates it from the words around it.
  void AppendElement(const xmlNode* node) {
    std::string content;
    AppendTextContent(node, content);
    const std::string spoken = NormalizeWhitespace(content);
    if (!content.empty() && IsSpace(content.front())) AppendText(" ");
    const size_t start = text_.size();
    if (!spoken.empty()) {
      StartTextIfNeeded();
      text_ += spoken;
      last_was_space_ = false;
      unbreakable_.push_back({start - block_begin_, text_.size() - block_begin_});
    }
    tokens_.push_back({Kind::kElement, node, start, text_.size()});
    if (!spoken.empty() && IsSpace(content.back())) AppendText(" ");
  }

  void StartTextIfNeeded() {
    if (block_has_text_) return;
    block_has_text_ = true;
    block_begin_ = text_.size();
  }

  void EndBlock(bool paragraph) {
    if (block_has_text_ && last_was_space_) TrimTrailingSpace();
    if (block_has_text_) {
      blocks_.push_back({{block_begin_, text_.size()}, paragraph, std::move(unbreakable_)});
    } else if (!blocks_.empty()) {
      blocks_.back().paragraph_end = blocks_.back().paragraph_end || paragraph;
    }
    unbreakable_.clear();
    block_has_text_ = false;
    last_was_space_ = false;
  }

  // Only markup without text can follow the space, so it sits at the end of the last text token.
  void TrimTrailingSpace() {
    text_.pop_back();
    const size_t size = text_.size();
    for (size_t k = tokens_.size(); k-- > 0;) {
      Token& token = tokens_[k];
      if (token.kind == Kind::kText) {
        token.end = size;
        if (token.begin == token.end) tokens_.erase(tokens_.begin() + static_cast<ptrdiff_t>(k));
        break;
      }
      token.begin = std::min(token.begin, size);
      token.end = std::min(token.end, size);
    }
  }

  std::string text_;
  std::vector<Token> tokens_;
  std::vector<Block> blocks_;
  bool block_has_text_ = false;
  bool last_was_space_ = false;
  size_t block_begin_ = 0;
  std::vector<Span> unbreakable_;
};

// Writes the tokens out as one <speak> document per segment, re-opening at the start of each
// segment the elements still open from the one before.
class SsmlWriter {
 public:
  SsmlWriter(const xmlNode* root, const std::string& text) : text_(text) {
    AppendStartTag(root, /*empty=*/false, speak_open_);
    AppendEndTag(root, speak_close_);
  }

  // Segment `index`; segments start in order, each once.
  void SwitchTo(size_t index) {
    while (started_ <= index) {
      if (started_ > 0) CloseDocument();
      out_.emplace_back();
      std::string& doc = out_.back().text;
      doc = speak_open_;
      for (const xmlNode* node : open_) AppendStartTag(node, /*empty=*/false, doc);
      ++started_;
    }
  }

  void Open(const xmlNode* node) {
    AppendStartTag(node, /*empty=*/false, out_.back().text);
    open_.push_back(node);
  }
  void Close(const xmlNode* node) {
    AppendEndTag(node, out_.back().text);
    if (!open_.empty()) open_.pop_back();
  }
  void Element(const xmlNode* node) { AppendSubtree(node, out_.back().text); }
  void Text(Span span) {
    AppendEscapedText(absl::string_view(text_).substr(span.begin, span.end - span.begin),
                      out_.back().text);
  }

  std::vector<SegmentText> Take() && {
    if (!out_.empty()) CloseDocument();
    return std::move(out_);
  }

 private:
  void CloseDocument() {
    std::string& doc = out_.back().text;
    for (auto it = open_.rbegin(); it != open_.rend(); ++it) AppendEndTag(*it, doc);
    doc += speak_close_;
  }

  const std::string& text_;
  std::string speak_open_;
  std::string speak_close_;
  std::vector<const xmlNode*> open_;
  std::vector<SegmentText> out_;
  size_t started_ = 0;
};

// A segment of the flattened SSML text.
struct SsmlSegment {
  Span text;
  bool paragraph_end = false;
};

std::vector<SegmentText> WriteSsmlSegments(const xmlNode* root, const SsmlFlattener& flat,
                                           const std::vector<SsmlSegment>& segments) {
  using Kind = SsmlFlattener::Kind;
  SsmlWriter writer(root, flat.text());
  // Boundary j lies between segment j and j + 1: the text of j ends at e(j), that of j + 1
  // starts at s(j); the bytes between (a space, if any) are dropped.
  const size_t boundaries = segments.size() - 1;
  auto e = [&](size_t j) { return segments[j].text.end; };
  auto s = [&](size_t j) { return segments[j + 1].text.begin; };
  size_t j = 0;
  for (const SsmlFlattener::Token& token : flat.tokens()) {
    if (token.kind == Kind::kText) {
      size_t a = token.begin;
      while (a < token.end) {
        while (j < boundaries && a >= s(j)) ++j;
        // The space between two segments, whether the split came before it (at a start tag in
        // front of it) or comes after it.
        if (j > 0 && a >= e(j - 1) && a < s(j - 1)) {
          a = std::min(token.end, s(j - 1));
          continue;
        }
        if (j < boundaries && a >= e(j)) {
          a = std::min(token.end, s(j));
          continue;
        }
        const size_t end = j < boundaries ? std::min(token.end, e(j)) : token.end;
        writer.SwitchTo(j);
        writer.Text({a, end});
        a = end;
      }
      continue;
    }
    if (token.kind == Kind::kElement && token.end > token.begin) {
      // Spoken content places it like text.
      while (j < boundaries && token.begin >= s(j)) ++j;
    } else {
      // Markup between two sentences stays with the first up to the first start tag.
      while (j < boundaries && token.begin > s(j)) ++j;
      if (token.kind == Kind::kOpen && j < boundaries && token.begin >= e(j)) ++j;
    }
    writer.SwitchTo(j);
    switch (token.kind) {
      case Kind::kOpen:
        writer.Open(token.node);
        break;
      case Kind::kClose:
        writer.Close(token.node);
        break;
      case Kind::kElement:
        writer.Element(token.node);
        break;
      case Kind::kText:
        break;
    }
  }
  std::vector<SegmentText> out = std::move(writer).Take();
  for (size_t k = 0; k < out.size() && k < segments.size(); ++k) {
    out[k].paragraph_end = segments[k].paragraph_end;
  }
  return out;
}

}  // namespace

std::string NormalizeWhitespace(absl::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (char c : text) {
    if (IsSpace(c)) {
      pending_space = !out.empty();
      continue;
    }
    if (pending_space) out += ' ';
    pending_space = false;
    out += c;
  }
  return out;
}

size_t CountWords(absl::string_view text) {
  size_t words = 0;
  bool in_word = false;
  for (char c : text) {
    const bool space = IsSpace(c);
    if (!space && !in_word) ++words;
    in_word = !space;
  }
  return words;
}

absl::StatusOr<std::vector<SegmentText>> SplitPlainText(absl::string_view text,
                                                        const SegmenterOptions& options) {
  RETURN_IF_ERROR(CheckUtf8(text));
  std::vector<SegmentText> out;
  auto end_paragraph = [&](absl::string_view raw) {
    const std::string paragraph = NormalizeWhitespace(raw);
    if (paragraph.empty()) return;
    for (const Span& span : SplitBlock(paragraph, /*unbreakable_spans=*/{}, options)) {
      out.push_back({paragraph.substr(span.begin, span.end - span.begin), false});
    }
    out.back().paragraph_end = true;
  };
  // Paragraphs are runs of lines that are not blank.
  size_t paragraph_begin = 0;
  size_t line_begin = 0;
  while (line_begin <= text.size()) {
    size_t line_end = text.find('\n', line_begin);
    if (line_end == absl::string_view::npos) line_end = text.size();
    const absl::string_view line = text.substr(line_begin, line_end - line_begin);
    if (std::all_of(line.begin(), line.end(), IsSpace)) {
      end_paragraph(text.substr(paragraph_begin, line_begin - paragraph_begin));
      paragraph_begin = line_end;
    }
    line_begin = line_end + 1;
  }
  end_paragraph(text.substr(std::min(paragraph_begin, text.size())));
  if (!out.empty()) out.back().paragraph_end = false;
  return out;
}

absl::StatusOr<std::vector<SegmentText>> SplitSsml(absl::string_view ssml,
                                                   const SegmenterOptions& options) {
  RETURN_IF_ERROR(CheckUtf8(ssml));
  if (std::all_of(ssml.begin(), ssml.end(), IsSpace)) return std::vector<SegmentText>();
  ASSIGN_OR_RETURN(DocPtr doc, ParseSsml(ssml));
  const xmlNode* root = xmlDocGetRootElement(doc.get());
  const SsmlFlattener flat(root);

  std::vector<SsmlSegment> segments;
  for (const SsmlFlattener::Block& block : flat.blocks()) {
    const absl::string_view text =
        absl::string_view(flat.text()).substr(block.text.begin, block.text.end - block.text.begin);
    for (const Span& span : SplitBlock(text, block.unbreakable, options)) {
      segments.push_back(
          {{block.text.begin + span.begin, block.text.begin + span.end}, /*paragraph_end=*/false});
    }
    segments.back().paragraph_end = block.paragraph_end;
  }
  if (segments.empty()) {
    // No text: a document of pauses and marks is one segment; one of nothing is none.
    const bool any_empty_element =
        std::any_of(flat.tokens().begin(), flat.tokens().end(), [](const auto& token) {
          return token.kind == SsmlFlattener::Kind::kElement && IsEmptyElement(token.node);
        });
    if (!any_empty_element) return std::vector<SegmentText>();
    segments.push_back({{0, 0}, false});
  }
  segments.back().paragraph_end = false;
  return WriteSsmlSegments(root, flat, segments);
}

}  // namespace montage::speech
