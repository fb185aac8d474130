// sluice/key.hpp — what every keyed sluice component requires of its key type.
//
// What it is for: requeue_queue, key_lock_table, backoff, the write-behind batcher and the
// pipelines all index state by a caller's key. They state that requirement once, with this
// concept, so a key type without a hash (or without equality) is reported in one readable line
// naming the component, instead of pages of errors from inside a hash table.
//
// Requirements (the concept `sluice::hashable_key<Key, Hash, KeyEqual>`):
//   - Key is copy-constructible and destructible (components keep a copy of the key);
//   - Hash is copy-constructible and `hash(key)` returns something convertible to std::size_t;
//   - KeyEqual is copy-constructible and `eq(a, b)` is convertible to bool.
// With the defaults (std::hash<Key>, std::equal_to<Key>) that means: give the key a std::hash
// specialisation and an operator==, or pass your own Hash / KeyEqual.
//
// Example:
//   struct uid { std::string value; bool operator==(const uid&) const = default; };
//   template <> struct std::hash<uid> { std::size_t operator()(const uid& u) const noexcept {
//     return std::hash<std::string>{}(u.value); } };
//   static_assert(sluice::hashable_key<uid>);
#pragma once

#include <concepts>
#include <cstddef>
#include <functional>

namespace sluice {

/// A key a sluice component can hash, compare and copy. See the file comment.
template <class Key, class Hash = std::hash<Key>, class KeyEqual = std::equal_to<Key>>
concept hashable_key =
    std::copy_constructible<Key> && std::destructible<Key> && std::copy_constructible<Hash> &&
    std::copy_constructible<KeyEqual> &&
    requires(const Key& a, const Key& b, const Hash& hash, const KeyEqual& eq) {
      { hash(a) } -> std::convertible_to<std::size_t>;
      { eq(a, b) } -> std::convertible_to<bool>;
    };

}  // namespace sluice
