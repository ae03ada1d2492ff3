//! No message anywhere carries a PIN: checked over the compiled
//! descriptors, so a field added tomorrow is caught too.

use prost::Message;
use prost_types::{field_descriptor_proto::Type, DescriptorProto, FileDescriptorSet};

fn secret_name(name: &str) -> bool {
    name.split('_').any(|w| matches!(w, "pin" | "puk" | "passcode" | "password" | "secret"))
}

fn walk(prefix: &str, m: &DescriptorProto, out: &mut Vec<String>, fields: &mut usize) {
    let name = format!("{prefix}.{}", m.name());
    for f in &m.field {
        *fields += 1;
        // A flag saying whether a PIN is needed is fine; a value is not.
        if secret_name(f.name()) && f.r#type() != Type::Bool {
            out.push(format!("{name}.{}", f.name()));
        }
    }
    for n in &m.nested_type {
        walk(&name, n, out, fields);
    }
}

#[test]
fn no_message_carries_a_pin() {
    let set = FileDescriptorSet::decode(pivgate_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut offenders = vec![];
    let mut fields = 0;
    let mut files = 0;
    for file in set.file.iter().filter(|f| f.package() == "pivgate.v1") {
        files += 1;
        for m in &file.message_type {
            walk(file.package(), m, &mut offenders, &mut fields);
        }
    }
    assert_eq!(files, 4, "the check must see every pivgate.v1 file");
    assert!(fields > 100, "only {fields} fields seen");
    assert!(offenders.is_empty(), "fields that could carry a PIN: {offenders:?}");
    // The check itself can fail.
    assert!(secret_name("new_pin") && secret_name("pin") && !secret_name("pinned") && !secret_name("spin_up"));
}
