// Splits text for text-to-speech into segments (sentences, or a few short ones) that are
// synthesised separately, cached one by one and concatenated without gaps. Splitting is
// deterministic and local: editing one sentence of a long script changes as few segments as
// possible, and a change in whitespace alone changes none, so the cache is reused.
//
// Plain text and SSML follow the same sentence rules. An SSML segment is a complete <speak>
// document that re-opens the elements around the content it holds.
//
// All functions are thread-safe and never throw; bad input is answered with INVALID_ARGUMENT.
#ifndef MONTAGE_SERVICES_SPEECH_SEGMENTER_H_
#define MONTAGE_SERVICES_SPEECH_SEGMENTER_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace montage::speech {

// One piece of text to synthesise.
struct SegmentText {
  // Plain text with whitespace normalised (see NormalizeWhitespace), or, for SSML input, a
  // complete document "<speak …>…</speak>".
  std::string text;
  // The segment ends a paragraph (a blank line in plain text, </p> in SSML) and more text follows,
  // so the caller may add a slightly longer pause. Never set on the last segment.
  bool paragraph_end = false;
};

struct SegmenterOptions {
  // Longest segment in characters (UTF-8 code points, not bytes) of text content; SSML markup does
  // not count. A longer sentence is cut at its last word break before the limit, or, for one
  // enormous word, at a code-point boundary. 0 means no limit. The only segments that may exceed
  // it are SSML elements that cannot be cut (<sub>, <say-as>, <phoneme>, <audio>) longer than it.
  size_t max_chars = 400;
  // Sentences are joined with the next sentence of the same paragraph while the segment is
  // shorter than this (and the result fits max_chars), so that "Yes." does not cost a call of its
  // own. Joining is greedy from the start of the paragraph and restarts after every segment that
  // reaches min_chars, so an edit changes only the segments up to the next long sentence.
  // 0 never joins: one sentence per segment.
  size_t min_chars = 0;
};

// Splits plain text into segments.
//
// A sentence ends after '.', '!', '?', '…' (or a run of them, like "?!" or "..."), possibly
// followed by closing quotes or brackets, then whitespace or the end of the paragraph. A '.' does
// not end a sentence inside a number ("3.14"), after a single capital initial ("J. R. R.
// Tolkien"), after a common abbreviation (case-sensitive: "Mr.", "Dr.", "e.g.", "etc.", …; "No."
// only before a number, as in "No. 5"), or after a dotted word followed by a lower-case one
// ("the U.S.A. is", but "in the U.S.A. Then"). An ellipsis, or a mark inside closing quotes,
// followed by a lower-case word does not end a sentence ("Wait… what?", "\"Stop!\" he said."). The
// CJK marks '。', '！' and '？' end a sentence even without whitespace after them.
//
// A blank line ends a paragraph (and so a segment); a single newline is a space. Empty or
// whitespace-only text gives no segments. Text that is not valid UTF-8 is INVALID_ARGUMENT
// "text: not valid UTF-8 at byte N" (N counts from 0).
absl::StatusOr<std::vector<SegmentText>> SplitPlainText(absl::string_view text,
                                                        const SegmenterOptions& options);

// Splits an SSML document into segments, each a well-formed <speak> document carrying the root's
// attributes and namespace declarations, e.g. `<speak><prosody rate="slow">First.
// Second.</prosody></speak>` gives `<speak><prosody rate="slow">First.</prosody></speak>` and
// `<speak><prosody rate="slow">Second.</prosody></speak>`.
//
// Text is split with the rules of SplitPlainText, across element boundaries; <s> and <p> (and
// their SSML 1.0 draft spellings <sentence> and <paragraph>) end a segment where they open and
// close, and </p> ends a paragraph. Markup between two sentences goes with the earlier one up to
// the first start tag, and with the later one from there on, so <break/> after a sentence stays
// with it. <sub>, <say-as>, <phoneme> and <audio> are never cut. Comments and processing
// instructions are dropped; whitespace in text is normalised.
//
// Errors (all INVALID_ARGUMENT, naming the field "text"): not valid UTF-8; malformed XML
// ("text: malformed SSML at line L: <parser message>"); a DOCTYPE (refused outright, so no
// entity can be declared or loaded); a root that is not <speak> in no namespace or in the SSML
// namespace. An empty or whitespace-only string, or a document without text or empty elements
// such as <break/>, gives no segments.
absl::StatusOr<std::vector<SegmentText>> SplitSsml(absl::string_view ssml,
                                                   const SegmenterOptions& options);

// Collapses runs of whitespace to one space and trims: the normal form that cache keys use.
std::string NormalizeWhitespace(absl::string_view text);

// Counts words (runs of non-whitespace), for duration estimates and metrics.
size_t CountWords(absl::string_view text);

}  // namespace montage::speech

#endif  // MONTAGE_SERVICES_SPEECH_SEGMENTER_H_
